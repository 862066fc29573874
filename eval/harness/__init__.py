"""The accuracy-versus-FLOPs harness behind ``vtprune eval``: grids of model x method x budget on the embedded image
and video benchmarks (``grid``, ``video``), greedy answers and accuracy (``predict``), and the table, CSV, JSON and
plot of a run (``report``)."""

from .grid import add_ratios, check_methods, configs, parse_budgets, parse_method, run_embedded, run_grid
from .predict import evaluate_accuracy, evaluate_video, predict, predict_video, video_accuracy
from .report import table, write_results
from .video import run_video

__all__ = [
    "add_ratios",
    "check_methods",
    "configs",
    "evaluate_accuracy",
    "evaluate_video",
    "parse_budgets",
    "parse_method",
    "predict",
    "predict_video",
    "run_embedded",
    "run_grid",
    "run_video",
    "table",
    "video_accuracy",
    "write_results",
]
