"""The typed records ``vtprune.get_stats`` returns: one ``StageStats`` per stage, one ``UnitStats`` per image or
video of each sample. Both are frozen and also readable as mappings (``stats["kept_indices"]``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


class _Record:
    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.__dataclass_fields__

    def __iter__(self):  # as a mapping iterates: the field names
        return iter(self.__dataclass_fields__)

    def keys(self):
        return self.__dataclass_fields__.keys()

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class UnitStats(_Record):
    """What a stage did to one image or video of one sample: kind ("image" / "video"), frames, tokens_before,
    tokens_after and kept_indices (LongTensor [tokens_after], ascending, into the unit's tokens entering the
    stage)."""

    kind: str
    frames: int
    tokens_before: int
    tokens_after: int
    kept_indices: torch.Tensor


@dataclass(frozen=True)
class StageStats(_Record):
    """What one stage did on one prefill.

    layer, method; tokens_before / tokens_after: visual tokens per row; kept_indices: LongTensor [batch, k] into
    the visual tokens entering the stage, ascending, rows keeping fewer padded with -1 on the right;
    units: per row, one ``UnitStats`` per image or video; selections: per row, the (tokens in, tokens kept) of each
    strategy call it took part in (one per unit, per frame with ``temporal="frame"``, one with
    ``units="joint"``: what scoring costs are counted on); select_time_s: wall time of choosing (budgets,
    scoring, selection, merging; scoring includes the last-token attention row computed at layer K-1 for
    attention-scored methods); budget: "plain" or "layer_average"; merged: whether pruned tokens were merged
    into kept ones; backend: the path each op ran ({"greedy": "torch", "compact": "triton", ...}); tower_layer:
    for a stage inside the vision tower (``layer`` -1), the tower layer after which it chose; for a layer-0 stage
    scored by the tower's attention, the tower layer it was read at.
    """

    layer: int
    method: str
    tokens_before: list
    tokens_after: list
    kept_indices: torch.Tensor
    units: list
    selections: list
    select_time_s: float
    budget: str
    merged: bool
    backend: dict
    tower_layer: int | None = None  # the tower layer a tower-scored stage chose after / read
    # The stage that carries the decode stage (decode_keep_ratio): per decoding step so far, per row, the visual
    # tokens that step attended to from decode_layer on ([] before the first step); None on other stages.
    decode_steps: list | None = None
