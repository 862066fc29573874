"""The options of ``vtprune robustness``, torch-free so that ``vtprune --help`` stays fast."""

from __future__ import annotations

DEFAULT_PERTURBATIONS = ("noise:1", "noise:4", "patch-noise:12", "patch-noise:24", "patch-solid:12", "patch-solid:24")
DEFAULT_LIMIT = 100  # test questions per model when no --limit is given


def add_arguments(ap) -> None:
    """The options of ``vtprune robustness`` (also ``python -m vtprune.eval.robustness``)."""
    ap.add_argument("--models", help="embedded models, comma-separated (default: all)")
    ap.add_argument(
        "--methods", help="methods, comma-separated, each optionally name:key=value;key=value (default: all registered)"
    )
    ap.add_argument("--budgets", default="11", help="percent of visual tokens kept (default: %(default)s)")
    ap.add_argument(
        "--perturbations",
        default=",".join(DEFAULT_PERTURBATIONS),
        help="noise:SIGMA (in 1/255), patch-noise:PIXELS, patch-solid:PIXELS (default: %(default)s)",
    )
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="test questions (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="test scenes and noise (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="questions per generate() call (default: %(default)s)")
    ap.add_argument("--output", help="results folder (default: a new vtprune-robustness-<time> folder)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads; tiny models run fastest on 1 (default: %(default)s)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="RUN",
        help="instead of measuring, merge the robustness.json of "
        "earlier runs (one unpruned control per model and perturbation) into --output (default: measure)",
    )
