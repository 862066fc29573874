"""lmms-eval hooks of the ``vtprune_sortofclevr`` task: the embedded Sort-of-CLEVR-style test split.

``test.jsonl`` holds the questions of ``make_split("test", 1000, seed=0)`` (eval/data/image.py) with each example's
split, split seed and index; ``doc_to_visual`` re-creates the scene from them and renders it (no image files are
shipped). Scoring is eval/data/image.py's exact match, overall and per question type.
Regenerate the JSONL after a change of eval/data/image.py with ``python utils.py``.

lmms-eval loads this file by path (``!function utils.…``), not as part of a package: imports are absolute.
"""

from __future__ import annotations

from pathlib import Path

from vtprune.eval.data import QUESTION_TYPES, make_example, score
from vtprune.eval.lmms import docs as lmms_docs
from vtprune.eval.lmms.docs import doc_to_target, doc_to_text  # noqa: F401 - hooks the task YAML names

N_EXAMPLES = 1000  # the first N of make_split("test", N, seed=0); --limit 500 is exactly the harness's default set


def doc_to_visual(doc):
    return [lmms_docs.example(doc, make_example, "utils.py").image]


def _metrics(doc, hit: float) -> dict:
    return {"exact_match": hit, f"acc_{doc['qtype']}": hit}


def process_results(doc, results):
    """Exact match after strip/lower (eval/data.score), as the embedded harness scores."""
    pred = results[0] if results else ""
    return _metrics(doc, score(pred, doc["answer"]))


def process_results_first_word(doc, results):
    """For chatty instruction-tuned models: the first word of the answer, punctuation stripped."""
    pred = results[0] if results else ""
    words = pred.strip().split()
    first = words[0].strip(".,;:!?\"'()").lower() if words else ""
    return _metrics(doc, score(first, doc["answer"]))


def rows(n: int = N_EXAMPLES) -> list[dict]:
    return lmms_docs.rows(make_example, QUESTION_TYPES, n)


def write_jsonl(path=None, n: int = N_EXAMPLES) -> Path:
    return lmms_docs.write_jsonl(rows(n), Path(path) if path else Path(__file__).with_name("test.jsonl"))


if __name__ == "__main__":
    print(write_jsonl())
