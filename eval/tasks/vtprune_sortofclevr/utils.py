"""lmms-eval hooks of the ``vtprune_sortofclevr`` task: the embedded Sort-of-CLEVR-style test split.

``test.jsonl`` holds the questions of ``make_split("test", 1000, seed=0)`` (eval/data.py) with each example's
split, split seed and index; ``doc_to_visual`` re-creates the scene from them and renders it (no image files are
shipped). Scoring is eval/data.py's exact match, overall and per question type.
Regenerate the JSONL after a change of eval/data.py with ``python utils.py``.

lmms-eval loads this file by path (``!function utils.…``), not as part of a package: imports are absolute.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from vtprune.eval.data import QUESTION_TYPES, make_example, score

N_EXAMPLES = 1000  # the first N of make_split("test", N, seed=0); --limit 500 is exactly the harness's default set
SPLIT, SPLIT_SEED = "test", 0


@lru_cache(maxsize=64)
def _example(split: str, split_seed: int, index: int, qtype: str):
    return make_example(split, split_seed, index, qtype)


def doc_to_visual(doc):
    ex = _example(doc["split"], int(doc["split_seed"]), int(doc["index"]), doc["qtype"])
    if ex.question != doc["question"] or ex.answer != doc["answer"]:
        raise ValueError(f"{doc['uid']}: eval/data.py no longer generates the stored example "
                         f"({ex.question!r} -> {ex.answer!r}); regenerate test.jsonl with `python utils.py`")
    return [ex.image]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]


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
    out = []
    for i in range(n):
        ex = make_example(SPLIT, SPLIT_SEED, i, QUESTION_TYPES[i % len(QUESTION_TYPES)])
        out.append({"uid": ex.uid, "split": SPLIT, "split_seed": SPLIT_SEED, "index": i, "qtype": ex.qtype,
                    "question": ex.question, "answer": ex.answer})
    return out


def write_jsonl(path=None, n: int = N_EXAMPLES) -> Path:
    path = Path(path) if path else Path(__file__).with_name("test.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    return path


if __name__ == "__main__":
    print(write_jsonl())
