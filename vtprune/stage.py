"""One pruning stage on the current sequence, in named steps: plan the selection items and their budgets
(``budgets.plan_items``), build each group's inputs, choose (``Method.select``: the one checked entry point),
apply the choice (keep mask, optional merging), lay out the shorter sequence, and record the stage's stats."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from .budgets import Item, plan_items
from .config import StageConfig
from .merge import apply_plan, merge_pruned
from .stats import StageStats, UnitStats
from .strategies.base import ENGINE_OPTIONS, Merged, Method, SelectionInputs


@dataclass
class TokenFlags:
    """Per-token facts of the current sequence, all [B, L_cur], carried (gathered) from stage to stage."""

    vis: torch.Tensor  # bool: visual token
    mask: torch.Tensor  # long: 2D attention mask (0 on padding and dummy slots)
    newline: torch.Tensor | None = None  # bool: LLaVA-NeXT row separator
    pad: torch.Tensor | None = None  # bool: mostly image padding (LLaVA pad-to-square)
    sizes: torch.Tensor | None = None  # float: original tokens each token stands for (merging)
    unit: torch.Tensor | None = None  # long: index of the token's image/video in its row (-1: not visual)
    segment: torch.Tensor | None = None  # long: packed sample the token belongs to (None: one sample per row)

    def gather(self, index: torch.Tensor, valid: torch.Tensor | None) -> TokenFlags:
        """The flags at ``index`` [B, L']; ``valid`` False marks dummy slots (None: there are none)."""
        out = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name).gather(1, index)
            for f in fields(self)
        }
        if valid is not None:
            out["vis"] = out["vis"] & valid
            out["mask"] = out["mask"] * valid.long()
        return TokenFlags(**out)


@dataclass
class Captured:
    """What the stage may score with, aligned to the current sequence where it is per token."""

    attention: torch.Tensor | None = None  # [B, L_cur]
    queries: torch.Tensor | None = None  # [B, L_cur, H, d_head]
    keys: torch.Tensor | None = None  # [B, L_cur, Hkv * d_head]
    pre_projector: torch.Tensor | None = None  # [projector rows of the batch, Din]
    pre_index: torch.Tensor | None = None  # [B, L_cur] long: each token's row of pre_projector (-1: none)
    projector: Callable | None = None
    tower_attention: torch.Tensor | None = None  # [B, L_cur] float32: a tower layer's attention to each token
    tower_keys: torch.Tensor | None = None  # [B, L_cur, d] that layer's keys (mean over heads)
    score_time_s: float = 0.0  # spent computing ``attention`` at layer K-1: FastV's scoring, counted as choosing


@dataclass
class Pruned:
    """What ``prune`` returns: the gather ``index`` [B, L'] into the current sequence, the hidden states the kept
    slots take (merged into when asked; None when the stage chose from ``visual`` rows alone), the gathered flags and
    the typed stats (the engine adds the backend that compacted the sequence)."""

    index: torch.Tensor
    hidden: torch.Tensor | None
    flags: TokenFlags
    stats: StageStats


def keep_layout(keep: torch.Tensor):
    """Right-aligned gather index for rows keeping different numbers of tokens.

    keep: [B, L] bool. Returns (index [B, L'] long, valid [B, L'] bool) with L' = max kept per row; each row's
    kept positions in order, preceded by dummy slots (valid False) so rows stay rectangular and left padded.
    """
    length = keep.shape[1]
    n_out = int(keep.sum(1).max())
    key = keep.long() * (length + torch.arange(length, device=keep.device))  # dropped first, then kept in order
    index = key.sort(dim=1, stable=True).indices[:, length - n_out :]
    return index, keep.gather(1, index)


def method_options(stage: StageConfig) -> dict:
    """The stage's options that go to the method (without the engine's own)."""
    return {k: v for k, v in stage.options.items() if k not in ENGINE_OPTIONS}


def prune(
    stage: StageConfig,
    method: Method,
    hidden: torch.Tensor | None,
    flags: TokenFlags,
    cap: Captured,
    units: list,
    num_layers: int,
    visual: torch.Tensor | None = None,
) -> Pruned:
    """Choose the visual tokens to keep. hidden: [B, L_cur, D]; units: per row, its ``Unit``s.

    visual: instead of ``hidden`` (then None), the visual tokens' hidden states alone, [visual tokens of the batch,
    D] in sequence order, row after row: what a layer-0 stage sees before the body has built the sequence. Not
    with merging or methods that read the text tokens.
    """
    merge = stage.options["merge"] or method.merges
    if visual is not None and (hidden is not None or merge or "text" in method.needs):
        raise ValueError("prune: visual= replaces hidden, without merging or text tokens")
    t0 = time.perf_counter()
    counts = flags.vis.sum(1).tolist()
    items = plan_items(stage, method, flags, units, num_layers, counts)
    choice = _Choice(flags, hidden, merge)
    source = _Source(hidden, visual, flags, cap, counts, "text" in method.needs)
    backends: dict = {}
    for (n, k), group in sorted(_groups(items).items()):
        inputs, rows, positions = source.inputs(group, n, backends)
        _check_needs(method, inputs, stage)
        picks = method.select(inputs, k, **method_options(stage))  # [G, k] ascending, checked
        choice.apply(group, rows, positions, picks, inputs.features, backends)
    index, new_flags = choice.layout()
    stats = _stats(
        stage, flags, units, counts, items, choice.chosen, time.perf_counter() - t0 + cap.score_time_s, backends, merge
    )
    return Pruned(index, choice.merged, new_flags, stats)


def _groups(items: list[Item]) -> dict:
    """Items by (tokens, budget): one strategy call serves a group, its rows stacked."""
    out: dict = {}
    for item in items:
        out.setdefault((item.n, item.k), []).append(item)
    return out


class _Source:
    """Where a group's inputs come from: the sequence's hidden states (or the visual rows alone) and what was
    captured for it, gathered per item."""

    def __init__(self, hidden, visual, flags: TokenFlags, cap: Captured, counts: list, text: bool):
        self.hidden, self.visual, self.flags, self.cap = hidden, visual, flags, cap
        self.row_start = [sum(counts[:r]) for r in range(len(counts))]  # each row's first token in ``visual``
        self.vis_pos = [flags.vis[r].nonzero().flatten() for r in range(len(counts))]
        self.text = text

    def inputs(self, group: list[Item], n: int, backends: dict):
        """(SelectionInputs of the group's items, their rows [G], their tokens' positions [G, n])."""
        rows = torch.tensor([it.row for it in group], device=self.flags.vis.device)
        positions = _stack([self.vis_pos[it.row][it.start : it.start + n] for it in group])  # [G, n]
        take = _taker(group, rows, positions, n)
        if self.visual is None:
            features = take(self.hidden)
        else:
            features = _stack([self.visual[self.row_start[it.row] + it.start :][:n] for it in group])
        text = text_mask = text_keys = None
        if self.text:
            take_text = _text_taker(self.flags, rows, positions)
            text, text_mask = take_text(self.hidden)
            if self.cap.keys is not None:
                text_keys, _ = take_text(self.cap.keys)
        return (
            SelectionInputs(
                features=features,
                attention=take(self.cap.attention),
                queries=take(self.cap.queries),
                keys=take(self.cap.keys),
                text_keys=text_keys,
                pre_projector=_pre_rows(self.cap, rows, positions),
                projector=self.cap.projector,
                grid=[it.grid for it in group],
                frames=[it.frames for it in group],
                kinds=[it.kind for it in group],
                pad_mask=take(self.flags.pad),
                newline_mask=take(self.flags.newline),
                tower_attention=take(self.cap.tower_attention),
                tower_keys=take(self.cap.tower_keys),
                text=text,
                text_mask=text_mask,
                backends=backends,
            ),
            rows,
            positions,
        )


def _taker(group: list[Item], rows: torch.Tensor, positions: torch.Tensor, n: int):
    """A function giving a per-token tensor's [G, n, ...] slice for the group: a view when there is one contiguous
    item (the common case: one image), a stack of slices when each item is contiguous, else one gather."""
    ends = positions[:, [0, -1]].tolist()
    contiguous = all(e[1] - e[0] == n - 1 for e in ends)

    def take(t):
        if t is None:
            return None
        if contiguous:
            if len(group) == 1:
                return t[group[0].row, ends[0][0] : ends[0][0] + n].unsqueeze(0)
            return torch.stack([t[it.row, e[0] : e[0] + n] for it, e in zip(group, ends)])
        return t[rows[:, None], positions]

    return take


class _Choice:
    """The stage's choice as it is made, group by group: which tokens stay, and (merging) what they become."""

    def __init__(self, flags: TokenFlags, hidden, merge: bool):
        self.flags, self.merge = flags, merge
        self.keep = ~flags.vis
        self.merged = hidden.clone() if merge else hidden
        self.sizes = flags.sizes
        if merge:
            ones = torch.ones(flags.vis.shape, dtype=torch.float32, device=hidden.device)
            self.sizes = ones if flags.sizes is None else flags.sizes.clone()
        self.chosen: list = []  # (item, its picks into its own tokens, ascending)

    def apply(self, group, rows, positions, picks, features, backends: dict) -> None:
        """picks: [G, k] ascending, or a strategy's ``Merged`` plan."""
        plan = picks if isinstance(picks, Merged) else None
        picks = picks.keep if plan is not None else picks
        kept_pos = positions.gather(1, picks)
        if self.merge:
            sizes = self.sizes[rows[:, None], positions]
            if plan is not None:
                merged, sizes, backends["merge"] = apply_plan(
                    features, picks, plan.target, plan.rule, sizes, with_backend=True
                )
            else:
                merged, sizes, backends["merge"] = merge_pruned(features, picks, sizes, with_backend=True)
            self.merged[rows[:, None], kept_pos] = merged
            self.sizes[rows[:, None], kept_pos] = sizes
        if len(group) == 1:
            self.keep[group[0].row, kept_pos[0]] = True
        else:
            self.keep[rows[:, None], kept_pos] = True
        self.chosen.extend(zip(group, picks))

    def layout(self):
        """(gather index [B, L'], the gathered flags). One row needs no dummy slots: its kept positions in order are
        the whole index."""
        keep = self.keep
        index, valid = (keep[0].nonzero().view(1, -1), None) if keep.shape[0] == 1 else keep_layout(keep)
        return index, replace(self.flags, sizes=self.sizes).gather(index, valid)


def _stats(
    stage: StageConfig,
    flags: TokenFlags,
    units: list,
    counts: list,
    items: list,
    chosen: list,
    seconds: float,
    backends: dict,
    merged: bool,
) -> StageStats:
    b = len(counts)
    row_kept = [[] for _ in range(b)]
    for it, picks in chosen:
        row_kept[it.row].append(picks + it.start)
    # One item's picks are already ascending: no concatenation or sort.
    row_kept = [(x[0] if len(x) == 1 else torch.cat(x).sort().values) if x else None for x in row_kept]
    return StageStats(
        layer=stage.layer,
        method=stage.method,
        tokens_before=counts,
        tokens_after=[0 if x is None else len(x) for x in row_kept],
        kept_indices=_pad_rows(row_kept, flags.vis.device),
        units=_unit_stats(flags, units, row_kept, counts),
        selections=[[(it.n, it.k) for it in items if it.row == r] for r in range(b)],
        select_time_s=seconds,
        budget=stage.options["budget"],
        merged=merged,
        backend=backends,
        decode_steps=[] if stage.options.get("decode_keep_ratio") is not None else None,
    )


def _stack(parts: list) -> torch.Tensor:
    """torch.stack, but one part becomes a view (the common single-item call copies nothing)."""
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


def _unit_stats(flags: TokenFlags, units: list, row_kept: list, counts: list) -> list:
    """Per row, one UnitStats per unit, from the row's kept indices into its current visual tokens (``counts``
    per row)."""
    out = []
    for r, row_units in enumerate(units):
        kept = row_kept[r] if row_kept[r] is not None else flags.vis.new_empty(0, dtype=torch.long)
        if len(row_units) == 1:  # the row's visual tokens are its one unit: nothing to split
            unit = row_units[0]
            out.append([UnitStats(unit.kind, unit.frames, counts[r], len(kept), kept)])
            continue
        ids = flags.unit[r][flags.vis[r]]
        row, start = [], 0
        for u, unit in enumerate(row_units):
            n = int((ids == u).sum())
            mine = kept[(kept >= start) & (kept < start + n)] - start
            row.append(UnitStats(unit.kind, unit.frames, n, len(mine), mine))
            start += n
        out.append(row)
    return out


def _text_taker(flags: TokenFlags, rows: torch.Tensor, positions: torch.Tensor):
    """A function giving, from a per-token tensor [B, L, D], each item's instruction: the text tokens (valid,
    non-visual) of its row after its last visual token (all of the row's, when none follows), left padded, as
    ([G, T, D], mask [G, T] bool). In a packed row, only those of the item's own sample."""
    keep = (~flags.vis & flags.mask.bool())[rows]
    if flags.segment is not None:
        segment = flags.segment[rows]
        keep &= segment == segment.gather(1, positions[:, :1])
    after = keep & (torch.arange(keep.shape[1], device=keep.device) > positions[:, -1:])
    keep = torch.where(after.any(1, keepdim=True), after, keep)
    index, valid = keep_layout(keep)

    def take(t: torch.Tensor):
        return t[rows].gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1])), valid

    return take


def _pre_rows(cap: Captured, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """The projector inputs of the items' tokens: [G, n, Din], zeros where a token has none (newlines)."""
    if cap.pre_projector is None:
        return None
    idx = cap.pre_index[rows[:, None], positions]  # [G, n]
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
    missing = {
        "attention": inputs.attention is None,
        "queries": inputs.queries is None,
        "keys": inputs.keys is None,
        "projector": inputs.projector is None or inputs.pre_projector is None,
        "text": inputs.text is None,
        "tower_attention": inputs.tower_attention is None or inputs.tower_keys is None,
    }
    for need, absent in missing.items():
        if need in method.needs and absent:
            where = {
                "projector": "the projector inputs",
                "text": "the text tokens",
                "tower_attention": "the vision tower's attention",
            }.get(need, f"{need} from layer {stage.layer - 1}")
            raise RuntimeError(f"method {method.name!r} needs {where}, which were not captured on this call")
