"""``python -m vtprune.eval.robustness``: the same as ``vtprune robustness``."""

from .run import main

main()
