"""One pruning stage on the current sequence: selection items and budgets, grouped strategy calls, merging, the
gather layout, and the stage's stats."""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch

from .config import StageConfig
from .stats import UnitStats
from .strategies.base import ENGINE_OPTIONS, Method, SelectionInputs
from .strategies.entropy import layer_average_keep
from .strategies.merge import merge_pruned
from .units import Item, largest_remainder, unit_budgets


@dataclass
class Sequence:
    """Per-token flags of the current sequence, all [B, L_cur], carried (gathered) from stage to stage."""

    vis: torch.Tensor  # bool: visual token
    mask: torch.Tensor  # long: 2D attention mask (0 on padding and dummy slots)
    newline: Optional[torch.Tensor] = None  # bool: LLaVA-NeXT row separator
    pad: Optional[torch.Tensor] = None  # bool: mostly image padding (LLaVA pad-to-square)
    sizes: Optional[torch.Tensor] = None  # float: original tokens each token stands for (merging)
    unit: Optional[torch.Tensor] = None  # long: index of the token's image/video in its row (-1: not visual)
    segment: Optional[torch.Tensor] = None  # long: packed sample the token belongs to (None: one sample per row)

    def gather(self, index: torch.Tensor, valid: Optional[torch.Tensor]) -> "Sequence":
        """The flags at ``index`` [B, L']; ``valid`` False marks dummy slots (None: there are none)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = None if t is None else t.gather(1, index)
        if valid is not None:
            out["vis"] = out["vis"] & valid
            out["mask"] = out["mask"] * valid.long()
        return Sequence(**out)


@dataclass
class Captured:
    """What the stage may score with, aligned to the current sequence where it is per token."""

    attention: Optional[torch.Tensor] = None  # [B, L_cur]
    queries: Optional[torch.Tensor] = None  # [B, L_cur, H, d_head]
    pre_projector: Optional[torch.Tensor] = None  # [projector rows of the batch, Din]
    pre_index: Optional[torch.Tensor] = None  # [B, L_cur] long: each token's row of pre_projector (-1: none)
    projector: Optional[Callable] = None
    score_time_s: float = 0.0  # spent computing ``attention`` at layer K-1: FastV's scoring, counted as choosing


def keep_layout(keep: torch.Tensor):
    """Right-aligned gather index for rows keeping different numbers of tokens.

    keep: [B, L] bool. Returns (index [B, L'] long, valid [B, L'] bool) with L' = max kept per row; each row's
    kept positions in order, preceded by dummy slots (valid False) so rows stay rectangular and left padded.
    """
    length = keep.shape[1]
    n_out = int(keep.sum(1).max())
    key = keep.long() * (length + torch.arange(length, device=keep.device))  # dropped first, then kept in order
    index = key.sort(dim=1, stable=True).indices[:, length - n_out:]
    return index, keep.gather(1, index)


def method_options(stage: StageConfig) -> dict:
    """The stage's options that go to the method (without the engine's own)."""
    return {k: v for k, v in stage.options.items() if k not in ENGINE_OPTIONS}


def plan_items(stage: StageConfig, method: Method, seq: Sequence, units: list, num_layers: int,
               counts: Optional[list] = None) -> list[Item]:
    """The selection items of this stage: one per unit (or per frame, or per row), each with its budget.

    units: per row, the ``Unit``s of its prefill (``seq.unit`` maps the current tokens to them); counts: each
    row's visual tokens, when the caller has them.
    """
    options = method_options(stage)
    items = []
    counts = seq.vis.sum(1).tolist() if counts is None else counts
    for r, row_units in enumerate(units):
        if counts[r] == 0:
            continue
        vis = seq.vis[r]
        if len(row_units) == 1:
            sizes = [counts[r]]
        else:
            sizes = torch.bincount(seq.unit[r][vis], minlength=len(row_units)).tolist()
        ks = unit_budgets(stage, [u.kind for u in row_units], sizes)
        if stage.options["budget"] == "layer_average":
            # EntropyPrune's convention: the budget is the average over all layers, layers before K keep all.
            ks = [0 if n == 0 else layer_average_keep(num_layers, stage.layer, n, k) for n, k in zip(sizes, ks)]
        starts = [sum(sizes[:u]) for u in range(len(sizes))]
        if method.budget_cap is not None:
            pad = None if seq.pad is None else seq.pad[r][vis]
            ks = [k if n == 0 else method.budget_cap(k, None if pad is None else pad[s:s + n], **options)
                  for s, n, k in zip(starts, sizes, ks)]
        if stage.options["units"] == "joint":
            kinds = {u.kind for u in row_units}
            items.append(Item(r, -1, kinds.pop() if len(kinds) == 1 else "mixed", 0, sum(sizes), sum(ks)))
            continue
        for u, (unit, start, n, k) in enumerate(zip(row_units, starts, sizes, ks)):
            items.extend(_unit_items(Item(r, u, unit.kind, start, n, k), unit, stage.options["temporal"]))
    return [it for it in items if it.k > 0]  # a part keeping nothing needs no strategy call


def _unit_items(item: Item, unit, temporal: str) -> list[Item]:
    """One unit's items: the whole unit, or its grid's frames (``temporal="frame"``), and its tail tokens apart
    from the grid, each with its largest-remainder share of the unit's budget. A pruned unit is no grid."""
    if item.n == 0 or unit.grid is None or item.n != unit.length:
        return [replace(item)]
    t, h, w = unit.grid
    frames = t if temporal == "frame" else 1
    parts = [h * w * t // frames] * frames + ([unit.tail] if unit.tail else [])
    if len(parts) == 1:
        return [replace(item, grid=(h, w), frames=t)]
    out, start = [], item.start
    for i, (n, k) in enumerate(zip(parts, largest_remainder(item.k, parts))):
        grid = ((h, w), t // frames) if i < frames else (None, 1)
        out.append(replace(item, start=start, n=n, k=k, grid=grid[0], frames=grid[1]))
        start += n
    return out


def run_stage(stage: StageConfig, method: Method, hidden: Optional[torch.Tensor], seq: Sequence, cap: Captured,
              units: list, num_layers: int, visual: Optional[torch.Tensor] = None):
    """Choose the visual tokens to keep. hidden: [B, L_cur, D]; units: per row, its ``Unit``s.

    visual: instead of ``hidden`` (then None), the visual tokens' hidden states alone, [visual tokens of the batch,
    D] in sequence order, row after row: what a layer-0 stage sees before the body has built the sequence. Not
    with merging or methods that read the text tokens.

    Returns (index [B, L'] into L_cur, hidden [B, L_cur, D] (merged into the kept tokens when asked; None when
    ``visual`` was given), the gathered Sequence, the fields of ``StageStats`` but the engine's own backends).
    """
    t0 = time.perf_counter()
    vis = seq.vis
    b = vis.shape[0]
    counts = vis.sum(1).tolist()
    items = plan_items(stage, method, seq, units, num_layers, counts)
    backends: dict = {}
    options = method_options(stage)
    if visual is not None and (hidden is not None or stage.options["merge"] or "text" in method.needs):
        raise ValueError("run_stage: visual= replaces hidden, without merging or text tokens")
    text, text_mask = _text_tokens(hidden, seq) if "text" in method.needs else (None, None)
    row_start = [sum(counts[:r]) for r in range(b)]  # each row's first token in ``visual``
    vis_pos = [vis[r].nonzero().flatten() for r in range(b)]
    keep = ~vis
    chosen = []  # (item, indices into the item's tokens, ascending)
    merged = hidden.clone() if stage.options["merge"] else hidden
    sizes = seq.sizes
    if stage.options["merge"]:
        sizes = torch.ones(vis.shape, dtype=torch.float32, device=hidden.device) if sizes is None else sizes.clone()
    groups: dict = {}
    for item in items:
        groups.setdefault((item.n, item.k), []).append(item)
    for (n, k), group in sorted(groups.items(), key=lambda g: g[0]):
        rows_t = torch.tensor([it.row for it in group], device=vis.device)
        positions = _stack([vis_pos[it.row][it.start:it.start + n] for it in group])  # [G, n]
        ends = positions[:, [0, -1]].tolist()
        first = [e[0] for e in ends]
        # A unit's tokens are usually one contiguous run: then one item is a view, several a stack of slices.
        contiguous = all(e[1] - e[0] == n - 1 for e in ends)

        def take(t):
            if t is None:
                return None
            if contiguous:
                if len(group) == 1:
                    return t[group[0].row, first[0]:first[0] + n].unsqueeze(0)
                return torch.stack([t[it.row, p:p + n] for it, p in zip(group, first)])
            return t[rows_t[:, None], positions]  # one gather straight to [G, n, ...]

        if visual is None:
            features = take(hidden)
        else:
            features = _stack([visual[row_start[it.row] + it.start:row_start[it.row] + it.start + n] for it in group])
        inputs = SelectionInputs(
            features=features, attention=take(cap.attention), queries=take(cap.queries),
            pre_projector=_pre_rows(cap, rows_t, positions), projector=cap.projector,
            grid=[it.grid for it in group], frames=[it.frames for it in group], kinds=[it.kind for it in group],
            pad_mask=take(seq.pad), newline_mask=take(seq.newline), seed=options.get("seed"),
            text=None if text is None else text[rows_t], text_mask=None if text is None else text_mask[rows_t],
            backends=backends)
        _check_needs(method, inputs, stage)
        picks = method.select(inputs, k, **options)  # [G, k] ascending, checked
        kept_pos = positions.gather(1, picks)
        if stage.options["merge"]:
            m, s, backends["merge"] = merge_pruned(inputs.features, picks, take(sizes), with_backend=True)
            merged[rows_t[:, None], kept_pos] = m
            sizes[rows_t[:, None], kept_pos] = s
        if len(group) == 1:
            keep[group[0].row, kept_pos[0]] = True
        else:
            keep[rows_t[:, None], kept_pos] = True
        chosen.extend(zip(group, picks))
    elapsed = time.perf_counter() - t0 + cap.score_time_s
    # One row needs no dummy slots: its kept positions in order are the whole index.
    index, valid = (keep[0].nonzero().view(1, -1), None) if b == 1 else keep_layout(keep)
    new_seq = replace(seq, sizes=sizes).gather(index, valid)
    row_kept = [[] for _ in range(b)]
    for it, picks in chosen:
        row_kept[it.row].append(picks + it.start)
    # One item's picks are already ascending: no concatenation or sort.
    row_kept = [(x[0] if len(x) == 1 else torch.cat(x).sort().values) if x else None for x in row_kept]
    stats = dict(layer=stage.layer, method=stage.method, tokens_before=counts,
                 tokens_after=[0 if x is None else len(x) for x in row_kept],
                 kept_indices=_pad_rows(row_kept, vis.device), units=_unit_stats(seq, units, row_kept, counts),
                 selections=[[(it.n, it.k) for it in items if it.row == r] for r in range(b)],
                 select_time_s=elapsed, budget=stage.options["budget"], merged=stage.options["merge"],
                 backend=backends)
    return index, merged, new_seq, stats


def _stack(parts: list) -> torch.Tensor:
    """torch.stack, but one part becomes a view (the common single-item call copies nothing)."""
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


def _unit_stats(seq: Sequence, units: list, row_kept: list, counts: list) -> list:
    """Per row, one UnitStats per unit, from the row's kept indices into its current visual tokens (``counts``
    per row)."""
    out = []
    for r, row_units in enumerate(units):
        kept = row_kept[r] if row_kept[r] is not None else seq.vis.new_empty(0, dtype=torch.long)
        if len(row_units) == 1:  # the row's visual tokens are its one unit: nothing to split
            unit = row_units[0]
            out.append([UnitStats(unit.kind, unit.frames, counts[r], len(kept), kept)])
            continue
        ids = seq.unit[r][seq.vis[r]]
        row, start = [], 0
        for u, unit in enumerate(row_units):
            n = int((ids == u).sum())
            mine = kept[(kept >= start) & (kept < start + n)] - start
            row.append(UnitStats(unit.kind, unit.frames, n, len(mine), mine))
            start += n
        out.append(row)
    return out


def _text_tokens(hidden: torch.Tensor, seq: Sequence):
    """Each row's text tokens (valid, non-visual), left padded: ([B, T, D], mask [B, T] bool)."""
    text = ~seq.vis & seq.mask.bool()
    index, valid = keep_layout(text)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])), valid


def _pre_rows(cap: Captured, rows_t: torch.Tensor, positions: torch.Tensor) -> Optional[torch.Tensor]:
    """The projector inputs of the items' tokens: [G, n, Din], zeros where a token has none (newlines)."""
    if cap.pre_projector is None:
        return None
    idx = cap.pre_index[rows_t[:, None], positions]  # [G, n]
    return cap.pre_projector[idx.clamp_min(0)].masked_fill((idx < 0)[..., None], 0.0)


def _pad_rows(rows, device):
    width = max((len(x) for x in rows if x is not None), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    for r, x in enumerate(rows):
        if x is not None:
            out[r, : len(x)] = x
    return out


def _check_needs(method: Method, inputs: SelectionInputs, stage: StageConfig):
    # grid / pad_mask / newline_mask may legitimately be None (a family without them); these may not.
    missing = {"attention": inputs.attention is None, "queries": inputs.queries is None,
               "projector": inputs.projector is None or inputs.pre_projector is None, "text": inputs.text is None}
    for need, absent in missing.items():
        if need in method.needs and absent:
            where = {"projector": "the projector inputs", "text": "the text tokens"}.get(
                need, f"{need} from layer {stage.layer - 1}")
            raise RuntimeError(f"method {method.name!r} needs {where}, which were not captured on this call")
