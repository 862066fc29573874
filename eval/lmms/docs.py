"""What the embedded benchmarks' lmms-eval tasks share (``eval/lmms/tasks/*/``): their documents, stored as the
generator's coordinates (split, split seed, index, question type) rather than media, and re-created on demand.

The task hook files are loaded by lmms-eval by path, so they import this module absolutely (``vtprune.eval``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

SPLIT, SPLIT_SEED = "test", 0


def rows(make: Callable, qtypes: Sequence[str], n: int) -> list[dict]:
    """The first ``n`` test documents: ``make(split, seed, index, qtype)`` with question types in rotation."""
    out = []
    for i in range(n):
        ex = make(SPLIT, SPLIT_SEED, i, qtypes[i % len(qtypes)])
        out.append(
            {
                "uid": ex.uid,
                "split": SPLIT,
                "split_seed": SPLIT_SEED,
                "index": i,
                "qtype": ex.qtype,
                "question": ex.question,
                "answer": ex.answer,
            }
        )
    return out


def write_jsonl(docs: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in docs))
    return path


@lru_cache(maxsize=64)
def _made(make: Callable, split: str, split_seed: int, index: int, qtype: str):
    return make(split, split_seed, index, qtype)


def example(doc: dict, make: Callable, script: str):
    """The example a stored document names, re-created; a clear error when the generator has changed since."""
    ex = _made(make, doc["split"], int(doc["split_seed"]), int(doc["index"]), doc["qtype"])
    if ex.question != doc["question"] or ex.answer != doc["answer"]:
        raise ValueError(
            f"{doc['uid']}: the generator no longer makes the stored example "
            f"({ex.question!r} -> {ex.answer!r}); regenerate test.jsonl with `python {script}`"
        )
    return ex


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]
