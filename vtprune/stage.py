"""One pruning stage on the current sequence: budgets, grouped strategy calls, merging, the gather layout."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Optional

import torch

from .config import StageConfig
from .strategies.base import Method, SelectionInputs
from .strategies.entropy import layer_average_keep
from .strategies.merge import merge_pruned


@dataclass(frozen=True)
class StageStats:
    """What one stage did on one prefill (``vtprune.get_stats`` returns one per stage). Also readable as a
    mapping (``stats["kept_indices"]``).

    layer, method; tokens_before / tokens_after: visual tokens per row; kept_indices: LongTensor [batch, k] into
    the visual tokens entering the stage, ascending, rows keeping fewer padded with -1 on the right;
    select_time_s: wall time of choosing (budgets, scoring, selection, merging); budget: "plain" or
    "layer_average"; merged: whether pruned tokens were merged into kept ones; backend: the path each op ran
    ({"greedy": "torch", "compact": "triton", ...}).
    """

    layer: int
    method: str
    tokens_before: list
    tokens_after: list
    kept_indices: torch.Tensor
    select_time_s: float
    budget: str
    merged: bool
    backend: dict

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return self.__dataclass_fields__.keys()

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sequence:
    """Per-token flags of the current sequence, all [B, L_cur], carried (gathered) from stage to stage."""

    vis: torch.Tensor  # bool: visual token
    mask: torch.Tensor  # long: 2D attention mask (0 on padding and dummy slots)
    newline: Optional[torch.Tensor] = None  # bool: LLaVA-NeXT row separator
    pad: Optional[torch.Tensor] = None  # bool: mostly image padding (LLaVA pad-to-square)
    sizes: Optional[torch.Tensor] = None  # float: original tokens each token stands for (merging)

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> "Sequence":
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = None if t is None else t.gather(1, index)
        out["vis"] = out["vis"] & valid
        out["mask"] = out["mask"] * valid.long()
        return Sequence(**out)


@dataclass
class Captured:
    """What the stage may score with, aligned to the current sequence where it is per token."""

    attention: Optional[torch.Tensor] = None  # [B, L_cur]
    queries: Optional[torch.Tensor] = None  # [B, L_cur, H, d_head]
    pre_projector: Optional[torch.Tensor] = None  # [total visual tokens of the batch, Din], row-major order
    projector: Optional[Callable] = None
    grids: Optional[list] = None


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
    return {k: v for k, v in stage.options.items() if k not in ("merge", "budget")}


def row_budgets(stage: StageConfig, method: Method, seq: Sequence, num_layers: int) -> list[int]:
    counts = seq.vis.sum(1).tolist()
    ks = [stage.budget(n) for n in counts]
    if stage.options.get("budget") == "layer_average":
        # EntropyPrune's convention: the budget is the average over all layers, layers before K keep all.
        ks = [0 if n == 0 else layer_average_keep(num_layers, stage.layer, n, k) for n, k in zip(counts, ks)]
    if method.budget_cap is not None:
        options = method_options(stage)
        ks = [k if n == 0 else method.budget_cap(k, None if seq.pad is None else seq.pad[r][seq.vis[r]], **options)
              for r, (n, k) in enumerate(zip(counts, ks))]
    return ks


def run_stage(stage: StageConfig, method: Method, hidden: torch.Tensor, seq: Sequence, cap: Captured,
              num_layers: int):
    """Choose the visual tokens to keep. hidden: [B, L_cur, D].

    Returns (index [B, L'] into L_cur, hidden [B, L_cur, D] (merged into the kept tokens when asked),
    the gathered Sequence, stats dict).
    """
    t0 = time.perf_counter()
    vis = seq.vis
    counts = vis.sum(1).tolist()
    ks = row_budgets(stage, method, seq, num_layers)
    backends: dict = {}
    # Projector inputs exist for every visual token except LLaVA-NeXT newlines.
    with_input = vis if seq.newline is None else vis & ~seq.newline
    offsets = torch.tensor([0] + with_input.sum(1).tolist()).cumsum(0).tolist()
    options = method_options(stage)
    text, text_mask = _text_tokens(hidden, seq) if "text" in method.needs else (None, None)
    keep = ~vis
    chosen_rows: list[Optional[torch.Tensor]] = [None] * len(counts)
    merged = hidden.clone() if stage.options["merge"] else hidden
    sizes = seq.sizes
    if stage.options["merge"]:
        sizes = torch.ones(vis.shape, dtype=torch.float32, device=hidden.device) if sizes is None else sizes.clone()
    for n, k in sorted(set(zip(counts, ks))):
        if n == 0:
            continue
        rows = [r for r in range(len(counts)) if (counts[r], ks[r]) == (n, k)]
        rows_t = torch.tensor(rows, device=hidden.device)
        sub = vis[rows_t]
        positions = sub.nonzero()[:, 1].view(len(rows), n)

        def take(t):
            # One gather straight to [rows, n, ...]: no copy of whole rows first.
            return None if t is None else t[rows_t[:, None], positions]

        pre = None if cap.pre_projector is None else torch.stack([_pre_rows(cap, seq, offsets, r) for r in rows])
        inputs = SelectionInputs(
            features=take(hidden), attention=take(cap.attention), queries=take(cap.queries),
            pre_projector=pre, projector=cap.projector,
            grid=None if cap.grids is None else [cap.grids[r] for r in rows],
            pad_mask=take(seq.pad), newline_mask=take(seq.newline), seed=options.get("seed"),
            text=None if text is None else text[rows_t], text_mask=None if text is None else text_mask[rows_t],
            backends=backends)
        _check_needs(method, inputs, stage)
        chosen = method.fn(inputs, k, **options).sort(dim=-1).values  # [rows, k]
        kept_pos = positions.gather(1, chosen)
        if stage.options["merge"]:
            m, s, backends["merge"] = merge_pruned(inputs.features, chosen, take(sizes), with_backend=True)
            for j, r in enumerate(rows):
                merged[r, kept_pos[j]] = m[j]
                sizes[r, kept_pos[j]] = s[j]
        for j, r in enumerate(rows):
            chosen_rows[r] = chosen[j]
            keep[r, kept_pos[j]] = True
    elapsed = time.perf_counter() - t0
    index, valid = keep_layout(keep)
    new_seq = replace(seq, sizes=sizes).gather(index, valid)
    # The engine adds the backend of its gather (compact) to ``backends`` after this returns.
    stats = dict(layer=stage.layer, method=stage.method, tokens_before=counts,
                 tokens_after=[0 if c is None else len(c) for c in chosen_rows],
                 kept_indices=_pad_rows(chosen_rows, hidden.device), select_time_s=elapsed,
                 budget=stage.options["budget"], merged=stage.options["merge"], backend=backends)
    return index, merged, new_seq, stats


def _text_tokens(hidden: torch.Tensor, seq: Sequence):
    """Each row's text tokens (valid, non-visual), left padded: ([B, T, D], mask [B, T] bool)."""
    text = ~seq.vis & seq.mask.bool()
    index, valid = keep_layout(text)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])), valid


def _pre_rows(cap: Captured, seq: Sequence, offsets: list, r: int) -> torch.Tensor:
    """Row r's projector inputs aligned to its visual tokens: [N_r, Din], zeros at newline tokens."""
    rows = cap.pre_projector[offsets[r]:offsets[r + 1]]
    if seq.newline is None:
        return rows
    out = rows.new_zeros(int(seq.vis[r].sum()), rows.shape[-1])
    out[~seq.newline[r][seq.vis[r]]] = rows
    return out


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
