"""The decode side of the engine: every step after a pruned prefill gets the mask of the kept prompt plus the new
tokens, positions in the original numbering, and (continuing a returned cache) only the tokens it has not seen.

The decode stage (DyCoke's dynamic KV pruning; ``decode_keep_ratio``, ``decode_layer`` = K): at every decoding step,
the step's last token's attention at layer K-1 (captured as FastV's is at prefill) picks the visual tokens it attends
to from layer K on; the others are masked out of this step only. The cache keeps every entry, so a later step may pick
a token an earlier one left out, and the cache and masks never disagree."""

from __future__ import annotations

import torch

from .budgets import ratio_keep
from .calls import CallState, max_position
from .masks import layer_kind, layer_mask


class DecodeSteps:
    """Mixed into ``Pruner``: the steps after a pruned prefill, found through the KV cache it filled."""

    @staticmethod
    def _drop_refed(state: CallState, kwargs: dict) -> dict:
        """``generate(past_key_values=cache)`` continuing a returned cache slices its input from the cache length,
        which the layer-0 stage made ``state.dropped`` shorter than what the call consumed: the first ``dropped``
        tokens it feeds are already in the cache. Drop them, when the 2D mask (the whole sequence) shows exactly
        that re-feed; anything else is left to ``_decode``'s checks."""
        mask = kwargs.get("attention_mask")
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if state.dropped == 0 or tokens is None or mask is None or not torch.is_tensor(mask) or mask.dim() != 2:
            return kwargs
        new = mask.shape[1] - state.prompt_len - state.fed
        if new < 1 or tokens.shape[1] - new != state.dropped:
            return kwargs
        cut = {key: kwargs[key][:, -new:] for key in ("input_ids", "inputs_embeds") if kwargs.get(key) is not None}
        cut.update(
            {
                key: kwargs[key][..., -new:]
                for key in ("position_ids", "mm_token_type_ids", "token_type_ids")
                if torch.is_tensor(kwargs.get(key))
            }
        )
        return dict(kwargs, **cut)

    def _decode(self, state: CallState, kwargs, embeds):
        state.phase = "decode"
        b, q = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise NotImplementedError("vtprune needs a 2D attention mask on decode steps")
            expected = state.prompt_len + state.fed + q
            if mask.shape[1] != expected:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} columns; after the pruned prompt of "
                    f"{state.prompt_len} tokens and {state.fed} fed since, {expected}"
                    " were expected (reuse of a cache across prompts is not supported)"
                )
            state.new_cols = mask[:, state.prompt_len :].long()
        else:
            state.new_cols = torch.ones(b, state.fed + q, dtype=torch.long, device=embeds.device)
        state.fed += q
        pos = kwargs.get("position_ids")
        if pos is not None:
            state.next_pos = max_position(pos) + 1
        first = state.outputs.get(0)
        if first is None:
            return None
        kwargs = dict(kwargs, attention_mask=torch.cat([first.kept_mask, state.new_cols], dim=1))
        if first.shift is not None and pos is not None:
            kwargs["position_ids"] = pos - first.shift[:, None]
        return (), kwargs

    def _layer_decode(self, state: CallState, i: int, hidden, kwargs):
        output = state.outputs.get(self.stages[i].layer)
        if output is None:
            return
        mask2d = torch.cat([output.kept_mask, state.new_cols], dim=1)
        output.overrides = {
            "attention_mask": layer_mask(self.adapter.text_config, output.layer, hidden, mask2d, kwargs)
        }
        if output.shift is not None:
            pos = kwargs.get("position_ids")
            if pos is None:
                q = hidden.shape[1]
                pos = (state.next_pos - q)[:, None] + torch.arange(q, device=hidden.device)
            pos = pos - output.shift[:, None]
            output.overrides.update(position_embeddings=self.adapter.rotary(hidden, pos), position_ids=pos)

    # ---------------------------------------------------------------- the decode stage
    def _decode_stage_hook(self, layer_idx: int, module, args, kwargs):
        """Pre-hook of decoder layers K.. on decode steps: the step's mask without the visual tokens it left out."""
        state = self._live()
        if state is None or state.phase != "decode" or not state.pruned:
            return None
        ratio, first = self.decode_stage
        hidden = args[0] if args else kwargs["hidden_states"]
        if layer_idx == first:
            state.decode_mask, state.decode_layer_masks = self._decode_choice(state, ratio), {}
        if state.decode_mask is None:  # every visual token kept: the step's own mask, untouched
            return None
        kwargs = dict(kwargs)
        # Layers K.. hold one sequence (no prefill stage after K-1): each kind's mask is built once per step.
        kind = layer_kind(self.adapter.text_config, layer_idx)
        if kind not in state.decode_layer_masks:
            state.decode_layer_masks[kind] = layer_mask(
                self.adapter.text_config, layer_idx, hidden, state.decode_mask, kwargs, state.flags.segment
            )
        kwargs["attention_mask"] = state.decode_layer_masks[kind]
        kwargs.pop("hidden_states", None)
        return (hidden,), kwargs

    def _decode_choice(self, state: CallState, ratio: float):
        """The 2D mask [B, prompt + fed] of this step from layer K on: each row keeps round(ratio * its visual
        tokens) by the step's last-token attention at layer K-1 (ties to the earlier token); None when that is
        all of them."""
        probs, state.decode_attention = state.decode_attention, None
        if probs is None:
            raise RuntimeError("vtprune: the decode stage found no attention captured at layer decode_layer-1")
        output = _stage_output(state)
        vis = state.flags.vis & output.kept_mask.bool()  # [B, P]: the cache's visual entries, as prefill left them
        n = vis.sum(1)
        keep = torch.tensor([ratio_keep(ratio, int(c)) for c in n], device=n.device)
        steps = next((st.decode_steps for st in state.stats if st.decode_steps is not None), None)
        if steps is not None:
            steps.append(torch.minimum(keep, n).tolist())
        if bool((keep >= n).all()):
            return None
        score = probs[:, : vis.shape[1]].float().masked_fill(~vis, float("-inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        places = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, places)
        dropped = vis & (rank >= keep[:, None])
        prompt = output.kept_mask * (~dropped).long()
        return torch.cat([prompt, state.new_cols], dim=1)


def _stage_output(state: CallState):
    """The last prefill stage's output: the sequence every layer from it on (the decode stage's) holds."""
    return state.outputs[max(state.outputs)]
