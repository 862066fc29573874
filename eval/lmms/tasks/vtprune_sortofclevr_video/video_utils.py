"""lmms-eval hooks of the ``vtprune_sortofclevr_video`` task: the embedded video benchmark's test split.

``test.jsonl`` holds the questions of ``make_video_split("test", 600, seed=0)`` (eval/data/video.py) with each
example's split, split seed and index; ``doc_to_visual`` re-creates the clip from them and returns its frames as one
video (no video files are shipped). Scoring is eval/data/image.py's exact match: overall, multi-frame, single-frame and
per question type. Regenerate the JSONL after a change of eval/data/video.py with ``python video_utils.py``.

lmms-eval loads this file by path (``!function video_utils.…``), not as part of a package: imports are absolute.
"""

from __future__ import annotations

from pathlib import Path

from vtprune.eval.data import score
from vtprune.eval.data.video import MULTI_FRAME_TYPES, VIDEO_QUESTION_TYPES, make_video_example
from vtprune.eval.lmms import docs as lmms_docs
from vtprune.eval.lmms.docs import doc_to_target, doc_to_text  # noqa: F401 - hooks the task YAML names

N_EXAMPLES = 600  # the first N of make_video_split("test", N, seed=0); --limit 300 is the harness's default set


def doc_to_visual(doc):
    return [lmms_docs.example(doc, make_video_example, "video_utils.py").frames]  # one video: its frames


def process_results(doc, results):
    """Exact match after strip/lower (eval/data.score), as the embedded harness scores."""
    hit = score(results[0] if results else "", doc["answer"])
    group = "multi_frame" if doc["qtype"] in MULTI_FRAME_TYPES else "single_frame"
    return {"exact_match": hit, f"acc_{group}": hit, f"acc_{doc['qtype']}": hit}


def rows(n: int = N_EXAMPLES) -> list[dict]:
    return lmms_docs.rows(make_video_example, VIDEO_QUESTION_TYPES, n)


def write_jsonl(path=None, n: int = N_EXAMPLES) -> Path:
    return lmms_docs.write_jsonl(rows(n), Path(path) if path else Path(__file__).with_name("test.jsonl"))


if __name__ == "__main__":
    print(write_jsonl())
