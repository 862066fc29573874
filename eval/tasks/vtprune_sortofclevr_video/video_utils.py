"""lmms-eval hooks of the ``vtprune_sortofclevr_video`` task: the embedded video benchmark's test split.

``test.jsonl`` holds the questions of ``make_video_split("test", 600, seed=0)`` (eval/video_data.py) with each
example's split, split seed and index; ``doc_to_visual`` re-creates the clip from them and returns its frames as one
video (no video files are shipped). Scoring is eval/data.py's exact match: overall, multi-frame, single-frame and
per question type. Regenerate the JSONL after a change of eval/video_data.py with ``python video_utils.py``.

lmms-eval loads this file by path (``!function video_utils.…``), not as part of a package: imports are absolute.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from vtprune.eval.data import score
from vtprune.eval.video_data import MULTI_FRAME_TYPES, VIDEO_QUESTION_TYPES, make_video_example

N_EXAMPLES = 600  # the first N of make_video_split("test", N, seed=0); --limit 300 is the harness's default set
SPLIT, SPLIT_SEED = "test", 0


@lru_cache(maxsize=64)
def _example(split: str, split_seed: int, index: int, qtype: str):
    return make_video_example(split, split_seed, index, qtype)


def doc_to_visual(doc):
    ex = _example(doc["split"], int(doc["split_seed"]), int(doc["index"]), doc["qtype"])
    if ex.question != doc["question"] or ex.answer != doc["answer"]:
        raise ValueError(f"{doc['uid']}: eval/video_data.py no longer generates the stored example "
                         f"({ex.question!r} -> {ex.answer!r}); regenerate test.jsonl with `python video_utils.py`")
    return [ex.frames]  # one video: its list of frames


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    """Exact match after strip/lower (eval/data.score), as the embedded harness scores."""
    hit = score(results[0] if results else "", doc["answer"])
    group = "multi_frame" if doc["qtype"] in MULTI_FRAME_TYPES else "single_frame"
    return {"exact_match": hit, f"acc_{group}": hit, f"acc_{doc['qtype']}": hit}


def rows(n: int = N_EXAMPLES) -> list[dict]:
    out = []
    for i in range(n):
        ex = make_video_example(SPLIT, SPLIT_SEED, i, VIDEO_QUESTION_TYPES[i % len(VIDEO_QUESTION_TYPES)])
        out.append({"uid": ex.uid, "split": SPLIT, "split_seed": SPLIT_SEED, "index": i, "qtype": ex.qtype,
                    "question": ex.question, "answer": ex.answer})
    return out


def write_jsonl(path=None, n: int = N_EXAMPLES) -> Path:
    path = Path(path) if path else Path(__file__).with_name("test.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    return path


if __name__ == "__main__":
    print(write_jsonl())
