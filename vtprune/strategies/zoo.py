"""ZOO-Prune (arXiv 2509.24837): zeroth-order sensitivity of each token through the projector, then
sensitivity-weighted greedy max-min diversity on the projected tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import torch

from .base import Range, ScoringShape, SelectionInputs, register
from .divprune import _greedy, diversity_flops


def random_directions(m: int, dim: int, seed: int | None) -> torch.Tensor:
    """``m`` random unit directions in R^dim, shared by all tokens. Returns [m, dim] float32 (CPU).

    Drawn as ``torch.randn(m, dim)`` from a CPU generator seeded with ``seed`` (global generator if None),
    then normalised, so the directions do not depend on the device.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    u = torch.randn(m, dim, generator=gen, dtype=torch.float32)
    return u / u.norm(dim=-1, keepdim=True)


@torch.no_grad()
def zoo_sensitivity(
    pre: torch.Tensor,
    projector: Callable[[torch.Tensor], torch.Tensor],
    m: int = 64,
    h: float = 0.01,
    seed: int | None = 0,
    chunk_rows: int = 8192,
    precision: str = "float32",
    form: str = "auto",
) -> torch.Tensor:
    """Central-difference sensitivity of each token through the projector.

    pre: [batch, N, Din] projector inputs; projector maps [rows, Din] -> [rows, D] and accepts float32.
    Returns S: [batch, N] float32 with S_i = (1/m) sum_j ||P(x_i + h u_j) - P(x_i - h u_j)|| / (2h).

    form: ``"auto"`` uses the MLP form when ``projector`` is a Linear -> activation -> Linear module (LLaVA's
    ``multi_modal_projector``, Qwen's ``merger.mlp``; see ``mlp_parts``) and the generic form otherwise;
    ``"mlp"`` requires that structure, ``"generic"`` forces the generic form.

    - generic: 2*m*batch*N perturbed rows through the projector, computed in float32 whatever ``pre.dtype`` (in
      half precision the difference of two nearby outputs is mostly rounding noise), streamed so that at most
      ``chunk_rows`` of them exist at once.
    - MLP: the same central differences with W1(x +- h u) = W1 x +- h W1 u and the second bias cancelling:
      N + m rows through W1 and m*N through W2 (``zoo_scoring_flops``), at most ``chunk_rows // 2`` (token,
      direction) pairs at once. More accurate too: the outputs' common part never enters the subtraction. The
      module's weights are read, never written, and it is not called (its hooks do not run).

    precision: ``"float32"`` (default) or ``"bfloat16"``: the MLP form's W1 and W2 products in bfloat16, with
    the perturbation, the activation difference and the norms in float32. The generic form is always float32.
    """
    if m < 1 or h <= 0 or chunk_rows < 2:
        raise ValueError(f"need m >= 1, h > 0 and chunk_rows >= 2; got m={m}, h={h}, chunk_rows={chunk_rows}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {sorted(_PRECISIONS)}")
    if form not in ("auto", "mlp", "generic"):
        raise ValueError(f"form={form!r}; allowed: 'auto', 'mlp', 'generic'")
    parts = None if form == "generic" else mlp_parts(projector)
    if form == "mlp" and parts is None:
        raise ValueError(f"form='mlp' needs a Linear -> activation -> Linear projector; got {type(projector)}")
    b, n, din = pre.shape
    x = pre.reshape(b * n, din).float()
    u = random_directions(m, din, seed).to(x.device)
    if parts is not None:
        norms = _mlp_norms(x, u, h, parts, chunk_rows // 2, _PRECISIONS[precision])
    else:
        norms = _generic_norms(x, u * h, projector, chunk_rows // 2)
    return norms.reshape(b, n, m).sum(dim=-1) / (2 * h * m)


_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _generic_norms(x: torch.Tensor, u: torch.Tensor, projector: Callable, step: int) -> torch.Tensor:
    """x [R, Din], u [m, Din] (already times h) -> ||P(x_r + u_j) - P(x_r - u_j)|| as [R * m], pair r * m + j."""
    m = u.shape[0]
    total = x.shape[0] * m
    # One norm per (token, direction) pair, summed at the end: deterministic, unlike a scattered add on GPU.
    norms = torch.empty(total, dtype=torch.float32, device=x.device)
    for start in range(0, total, step):
        stop = min(start + step, total)
        pair = torch.arange(start, stop, device=x.device)
        token, direction = pair // m, pair % m
        # One buffer holds the +h and -h rows of this chunk; perturb it in place.
        rows = x[torch.cat([token, token])]
        delta = u[direction]
        rows[: token.numel()] += delta
        rows[token.numel() :] -= delta
        plus, minus = projector(rows).float().chunk(2)
        norms[start:stop] = (plus - minus).norm(dim=-1)
    return norms


def _mlp_norms(x: torch.Tensor, u: torch.Tensor, h: float, parts, step: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``_generic_norms`` of an MLP projector: ||W2 (act(a + v_j) - act(a - v_j))|| with a = W1 x_r + b1 and
    v_j = h W1 u_j. x [R, Din], u [m, Din] unit directions -> [R * m] float32, pair r * m + j."""
    lin1, act, lin2 = parts
    w1, w2 = lin1.weight.to(x.device, dtype), lin2.weight.to(x.device, dtype)  # copies only if dtype/device differ
    b1 = None if lin1.bias is None else lin1.bias.to(x.device, torch.float32)
    v = torch.nn.functional.linear(u.to(dtype), w1).float() * h  # [m, H], no bias: it is in a
    m = u.shape[0]
    norms = torch.empty(x.shape[0], m, dtype=torch.float32, device=x.device)
    tokens = max(1, step // m)  # whole tokens per chunk, or one token split over directions
    dirs = min(m, step)
    for t0 in range(0, x.shape[0], tokens):
        a = torch.nn.functional.linear(x[t0 : t0 + tokens].to(dtype), w1).float()  # [T, H]
        if b1 is not None:
            a += b1
        for d0 in range(0, m, dirs):
            vv = v[d0 : d0 + dirs]
            diff = act(a[:, None] + vv)  # [T, M', H], float32
            diff -= act(a[:, None] - vv)
            out = torch.nn.functional.linear(diff.to(dtype), w2)  # W2's bias cancels in the difference
            norms[t0 : t0 + tokens, d0 : d0 + dirs] = out.float().norm(dim=-1)
    return norms.reshape(-1)


_ELEMENTWISE = (
    torch.nn.GELU,
    torch.nn.ReLU,
    torch.nn.SiLU,
    torch.nn.Tanh,
    torch.nn.Sigmoid,
    torch.nn.LeakyReLU,
    torch.nn.ReLU6,
    torch.nn.Hardswish,
    torch.nn.Mish,
    torch.nn.ELU,
    torch.nn.Identity,
)


def mlp_parts(projector) -> tuple[torch.nn.Linear, torch.nn.Module, torch.nn.Linear] | None:
    """(first Linear, activation, second Linear) when ``projector`` computes exactly Linear -> act -> Linear.

    Recognised: an ``nn.Sequential`` of three such modules (Qwen2-VL / Qwen2.5-VL ``merger.mlp``), and a module
    named ``*MultiModalProjector`` whose only children are ``linear_1``, ``act``, ``linear_2`` (LLaVA's). The
    activation must be elementwise: a known ``torch.nn`` activation or one from ``transformers.activations``.
    Anything else (plain callables, other modules) returns None and gets the generic form.
    """
    if isinstance(projector, torch.nn.Sequential) and len(projector) == 3:
        first, act, second = projector
    elif (
        isinstance(projector, torch.nn.Module)
        and type(projector).__name__.endswith("MultiModalProjector")
        and [name for name, _ in projector.named_children()] == ["linear_1", "act", "linear_2"]
    ):
        first, act, second = projector.linear_1, projector.act, projector.linear_2
    else:
        return None
    elementwise = isinstance(act, _ELEMENTWISE) or type(act).__module__ == "transformers.activations"
    linear = type(first) is torch.nn.Linear and type(second) is torch.nn.Linear  # not quantised subclasses
    if not (elementwise and linear and first.out_features == second.in_features):
        return None
    return first, act, second


def mlp_shapes(projector) -> tuple[int, int, int] | None:
    """(Din, H, D) of a projector ``mlp_parts`` recognises, else None."""
    parts = mlp_parts(projector)
    return None if parts is None else (parts[0].in_features, parts[0].out_features, parts[2].out_features)


def zoo_scoring_flops(n: int, m: int, shapes: tuple[int, int, int], form: str = "mlp") -> int:
    """FLOPs (2 per multiply-add) of ``zoo_sensitivity``'s matrix products for ``n`` tokens (all samples), ``m``
    directions and a projector Linear(Din -> H) -> act -> Linear(H -> D), ``shapes = (Din, H, D)``.

    form ``"mlp"``: (N + m) rows through W1 and m*N through W2; ``"generic"``: 2*m*N rows through both. Elementwise
    work (perturbation, activation, differences, norms: O(m*N*H)) is not counted.
    """
    din, hidden, dout = shapes
    if form == "mlp":
        return 2 * (n + m) * din * hidden + 2 * m * n * hidden * dout
    if form == "generic":
        return 2 * (2 * m * n) * (din * hidden + hidden * dout)
    raise ValueError(f"form={form!r}; allowed: 'mlp', 'generic'")


def minmax_normalise(s: torch.Tensor) -> torch.Tensor:
    """Per-row min-max scaling of [batch, N] to [0, 1]; a constant row becomes all ones (no preference)."""
    lo = s.amin(dim=-1, keepdim=True)
    span = s.amax(dim=-1, keepdim=True) - lo
    return torch.where(span > 0, (s - lo) / span.clamp_min(torch.finfo(s.dtype).tiny), torch.ones_like(s))


def _flops(shape: ScoringShape, m=64, **_) -> int:
    """The sensitivity's products (the MLP form when the adapter gives the projector's Linear -> act -> Linear
    widths, else 2·m·N perturbed projector rows), then the diversity terms on the projected tokens."""
    if shape.projector_dims is not None:
        return zoo_scoring_flops(shape.n, m, shape.projector_dims, form="mlp") + diversity_flops(shape)
    return 2 * m * shape.n * shape.projector_row + diversity_flops(shape)


# The option ranges zoo and zoo_stable share (checked when the pruner is applied).
Directions = Annotated[int, Range(ge=1)]
Step = Annotated[float, Range(gt=0)]


@register(
    "zoo",
    needs=("projector", "newline_mask"),
    flops=_flops,
    description="zeroth-order projector sensitivity x greedy max-min diversity",
)
def zoo_select(
    inputs: SelectionInputs,
    k: int,
    m: Directions = 64,
    h: Step = 0.01,
    seed: int | None = 0,
    chunk_rows: Annotated[int, Range(ge=2)] = 8192,
    precision: Literal["float32", "bfloat16"] = "float32",
) -> torch.Tensor:
    """ZOO-Prune selection of ``k`` of the ``N`` tokens. Returns [batch, k] in pick order.

    pre_projector: [batch, N, Din] with projector mapping [*, Din] -> [*, D]. The engine groups Qwen's 2x2
    patches beforehand (Din = 4 * D_v); a [batch, G*N, D_v] tensor is grouped here the same way (G
    consecutive rows per token, the merger order). The engine passes a projector that accepts float32.
    features: [batch, N, D] projected tokens, used for the cosine distances.

    First pick = the most sensitive token; each next pick maximises S_j * min_{i picked} (1 - cos(z_j, z_i))
    with S min-max normalised per row. ``seed`` fixes the random directions (None: torch's global generator).
    ``precision="bfloat16"`` computes the projector products of an MLP projector in bfloat16 (``zoo_sensitivity``);
    the default float32 keeps the finite differences exact to float32.
    """
    if inputs.pre_projector is None or inputs.projector is None:
        raise ValueError("zoo needs inputs.pre_projector and inputs.projector; got None")
    b, n = inputs.batch, inputs.num_tokens
    pre = inputs.pre_projector
    if pre.dim() != 3 or pre.shape[0] != b or pre.shape[1] % n:
        raise ValueError(
            f"pre_projector has shape {tuple(pre.shape)}; expected [{b}, G*{n}, Din] for features "
            f"of shape {tuple(inputs.features.shape)}"
        )
    pre = pre.reshape(b, n, -1)
    sens = zoo_sensitivity(pre, inputs.projector, m=m, h=h, seed=seed, chunk_rows=chunk_rows, precision=precision)
    weights = minmax_normalise(sens).to(inputs.features.device)
    if inputs.newline_mask is not None:
        # LLaVA-NeXT row separators are learned vectors with no projector input: least sensitive by definition.
        weights = weights.masked_fill(inputs.newline_mask.to(weights.device), 0.0)
    return _greedy(inputs, inputs.features, k, weights)
