"""Attention debiasing (arXiv 2508.17807) for attention-scored strategies such as FastV.

All functions take text-to-vision attention scores [batch, N] (N visual tokens in raster order) and return
rescaled scores of the same shape; none changes which tokens exist, only their ranking.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

DEBIAS_MODES = (None, "position", "sink", "both")
_CURVE_FORMAT = "vtprune.position_curve"


def _positions(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.float32) / n


def fit_log_trend(
    scores: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust per-row fit of log(score + eps) ~ a + b*x with x = i/N. Returns (a [batch], b [batch]).

    Theil-Sen: b = median of pairwise slopes, a = median of the residual offsets. The tokens that matter
    are exactly the high-score outliers, so the fit must ignore them rather than down-weight them, and
    Theil-Sen does with no scale estimate or tuning constant (a Huber/IRLS fit needs both and iterates).
    Pairs are (i, i+s) for strides s in {N/4, N/3, N/2}: about 1.9 N pairs instead of N^2/2, all with a
    large x gap so each slope is precise. A token is in at most 6 pairs, so the median survives at least
    15 % of outlying tokens (about 25 % when they are spread out). Deterministic and batched.
    ``valid`` [batch, N] bool excludes tokens (padding); a row with no valid pair gets a = b = 0 (no correction).
    """
    b_, n = scores.shape
    y = torch.log(scores.float().clamp_min(0) + eps)
    if valid is None:
        valid = torch.ones_like(y, dtype=torch.bool)
    valid = valid.to(device=y.device, dtype=torch.bool)
    slopes = []
    for s in sorted({max(1, n // 4), max(1, n // 3), max(1, n // 2)}):
        if s >= n:
            continue
        d = (y[:, s:] - y[:, :-s]) * (n / s)
        slopes.append(d.masked_fill(~(valid[:, s:] & valid[:, :-s]), float("nan")))
    if not slopes:
        zero = torch.zeros(b_, device=y.device)
        return zero, zero.clone()
    slope = torch.nanmedian(torch.cat(slopes, dim=1), dim=1).values.nan_to_num(0.0)
    offset = (y - slope[:, None] * _positions(n, y.device)).masked_fill(~valid, float("nan"))
    intercept = torch.nanmedian(offset, dim=1).values.nan_to_num(0.0)
    return intercept, slope


def _resample_curve(curve: torch.Tensor, n: int) -> torch.Tensor:
    """Evaluate a positive curve [M] sampled at j/M at the positions i/n, interpolating (and, past the last
    sample, extrapolating) linearly in log space, which is exact for an exponential. Returns [n]."""
    m = curve.numel()
    log_c = torch.log(curve.float())
    if m == 1:
        return torch.exp(log_c).expand(n)
    p = torch.arange(n, dtype=torch.float32, device=curve.device) * (m / n)
    lo = p.floor().long().clamp_max(m - 2)
    w = p - lo.float()
    return torch.exp((1 - w) * log_c[lo] + w * log_c[lo + 1])


def debias_position(
    scores: torch.Tensor, mode="sample", valid: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Divide out the recency trend of attention scores [batch, N]. Returns float32 [batch, N].

    mode "sample": each row's own exponential trend, fitted robustly (``fit_log_trend``), so no
    calibration data is needed and each image gets its own slope. mode = a tensor [M]: a calibrated
    per-model curve (``fit_position_curve``), resampled to N if M != N.
    """
    n = scores.shape[-1]
    if isinstance(mode, torch.Tensor):
        trend = _resample_curve(as_curve(mode).to(scores.device), n)[None]
    elif mode == "sample":
        a, b = fit_log_trend(scores, valid, eps)
        trend = torch.exp(a[:, None] + b[:, None] * _positions(n, scores.device))
    else:
        raise ValueError(f"unknown position-debias mode {mode!r}; allowed: 'sample' or a curve tensor [N]")
    return scores.float() / trend


def fit_position_curve(samples: list[torch.Tensor]) -> torch.Tensor:
    """Per-model curve mu * exp(sigma * x), x = i/N, fitted (Theil-Sen in log space) to the mean of many
    attention-score tensors, each [N] or [batch, N] with the same N. Returns [N] float32."""
    if not samples:
        raise ValueError("fit_position_curve needs at least one score tensor")
    rows = [s.float().reshape(-1, s.shape[-1]).cpu() for s in samples]
    lengths = sorted({r.shape[-1] for r in rows})
    if len(lengths) != 1:
        raise ValueError(f"all score tensors must have the same N; got N in {lengths}")
    mean = torch.cat(rows).mean(dim=0, keepdim=True)
    a, b = fit_log_trend(mean)
    return torch.exp(a[:, None] + b[:, None] * _positions(lengths[0], "cpu"))[0]


def save_curve(path, curve: torch.Tensor) -> None:
    """Write a position curve [N] as JSON (readable, no pickle)."""
    values = [float(v) for v in curve.flatten()]
    Path(path).write_text(json.dumps({"format": _CURVE_FORMAT, "version": 1, "curve": values}))


def load_curve(path) -> torch.Tensor:
    """Read a curve written by ``save_curve``. Returns [N] float32."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != _CURVE_FORMAT:
        raise ValueError(f"{path} is not a vtprune position curve (expected format {_CURVE_FORMAT!r})")
    return torch.tensor(data["curve"], dtype=torch.float32)


def as_curve(curve) -> torch.Tensor:
    """A position curve given as a tensor [M] or as the path of one saved by ``save_curve``, checked: 1-D, finite
    and positive. Returns [M] float32."""
    if not isinstance(curve, torch.Tensor):
        curve = load_curve(curve)
    if curve.dim() != 1 or curve.numel() == 0 or not bool(torch.isfinite(curve).all() and (curve > 0).all()):
        raise ValueError(f"a position curve must be 1-D, finite and positive; got shape {tuple(curve.shape)}")
    return curve.float()


def suppress_sinks(
    scores: torch.Tensor, z: float = 5.0, min_ratio: float = 10.0, valid: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Set attention-sink scores to the row median. scores: [batch, N] -> float32 [batch, N].

    Rule, per row in log space over the valid tokens: a sink is a token with
    log(s) > median + max(z * 1.4826 * MAD, log(min_ratio)). MAD measures the spread of ordinary tokens
    without being inflated by the sinks themselves; the ``min_ratio`` floor keeps a nearly flat row from
    flagging mildly salient tokens (a sink is at least ``min_ratio`` times the median). Sinks get the
    median, not 0: they are demoted to ordinary tokens, not banned.
    """
    s = scores.float()
    if valid is None:
        valid = torch.ones_like(s, dtype=torch.bool)
    valid = valid.to(device=s.device, dtype=torch.bool)
    y = torch.log(s.clamp_min(0) + eps).masked_fill(~valid, float("nan"))
    med = torch.nanmedian(y, dim=1, keepdim=True).values
    mad = torch.nanmedian((y - med).abs(), dim=1, keepdim=True).values * 1.4826
    limit = med + torch.clamp_min(z * mad, math.log(min_ratio))
    sinks = valid & (y > limit)
    median_score = torch.nanmedian(s.masked_fill(~valid, float("nan")), dim=1, keepdim=True).values
    return torch.where(sinks, median_score.expand_as(s), s)


def zero_padding(scores: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Scores [batch, N] with padding patches (pad_mask [batch, N] True) set to 0."""
    return scores.masked_fill(pad_mask.to(device=scores.device, dtype=torch.bool), 0)


def padding_cap(pad_mask: torch.Tensor | None, k: int) -> int:
    """Budget capped at the number of non-padding patches, as the paper does for LLaVA pad-to-square.

    pad_mask: [batch, N] bool or None. The engine calls this to lower ``k`` before calling the strategy;
    for a batch it is the smallest non-padding count over the rows (at least 1), so call it per row for
    per-sample budgets.
    """
    if pad_mask is None:
        return k
    n_valid = int((~pad_mask.bool()).sum(dim=-1).min())
    return min(k, max(1, n_valid))


def debias_scores(
    scores: torch.Tensor, how: str | None, curve=None, pad_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the debiasing named by ``how`` to scores [batch, N]. Returns float32 [batch, N].

    how: None (unchanged), "position" (recency trend), "sink" (padding to 0 and sinks to the median) or
    "both" (padding, then position, then sinks). curve: None for the per-sample fit, a tensor [M], or the
    path of a curve saved with ``save_curve``.
    """
    if how not in DEBIAS_MODES:
        raise ValueError(f"unknown debias {how!r}; allowed: {list(DEBIAS_MODES)}")
    scores = scores.float()
    valid = None
    if how in ("sink", "both") and pad_mask is not None:
        scores = zero_padding(scores, pad_mask)
        valid = ~pad_mask.to(device=scores.device, dtype=torch.bool)
    if how in ("position", "both"):
        mode = "sample" if curve is None else as_curve(curve)
        scores = debias_position(scores, mode, valid=valid)
    if how in ("sink", "both"):
        scores = suppress_sinks(scores, valid=valid)
    return scores
