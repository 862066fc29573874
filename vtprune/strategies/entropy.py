"""EntropyPrune (arXiv 2602.17196): keep the visual tokens whose per-head query states carry the most
matrix entropy, pruning at the layer after the visual "entropy collapse"."""

from __future__ import annotations

import math

import torch

from .base import SelectionInputs, register

COLLAPSE_ATTR = "_vtprune_collapse_layer"  # set on a model by vtprune.calibrate.find_collapse_layer


def _spectral_entropy(gram: torch.Tensor, log_base: float, normalize: bool = True) -> torch.Tensor:
    """-sum(l log l) / log_base over the eigenvalues l of symmetric PSD gram [..., M, M] (float64).

    normalize=True divides the eigenvalues by their sum first (a proper entropy in [0, 1]); False uses them as
    they are, as EntropyPrune's released code does, so the score mixes spread and magnitude.
    """
    lam = torch.linalg.eigvalsh(gram).clamp_min(0)  # tiny negative eigenvalues are rounding error
    if normalize:
        total = lam.sum(dim=-1, keepdim=True)
        lam = lam / torch.where(total > 0, total, torch.ones_like(total))
    plogp = torch.where(
        lam > 0, lam * torch.log(torch.where(lam > 0, lam, torch.ones_like(lam))), torch.zeros_like(lam)
    )
    return -plogp.sum(dim=-1) / log_base


def entropy_scores(queries: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Matrix entropy of each token's per-head query states.

    queries: [batch, N, H, d_head]. Returns [batch, N] float64.
    For token t, R = Z_t - mean over heads (H x d_head). The covariance R^T R / H (d_head x d_head) and the
    dual Gram R R^T / H (H x H) share their non-zero eigenvalues, so the smaller H x H problem is solved.
    Score = -sum(l log l) / log H over those eigenvalues l (clamped at 0): as released (``normalize=False``),
    or with l normalised to sum 1 first (``normalize=True``, a proper entropy in [0, 1)).
    """
    if queries.dim() != 4 or queries.shape[2] < 2:
        raise ValueError(f"queries must be [batch, N, H, d_head] with H >= 2; got shape {tuple(queries.shape)}")
    heads = queries.shape[2]
    z = queries.double()
    r = z - z.mean(dim=2, keepdim=True)
    gram = r @ r.transpose(-1, -2) / heads
    return _spectral_entropy(gram, math.log(heads), normalize)


# EntropyPrune's published collapse layer per model family (its released scripts: 2 for LLaVA-1.5, 1 for
# Qwen2.5-VL); families not listed take the LLaVA value.
COLLAPSE_LAYERS = {"qwen2_vl": 1, "qwen2_5_vl": 1, "qwen3_vl": 1, "qwen3_vl_moe": 1}
DEFAULT_COLLAPSE_LAYER = 2


def _entropy_layer(adapter) -> int:
    # A layer found by vtprune.calibrate.find_collapse_layer on this model wins over the family's published one.
    found = getattr(adapter.model, COLLAPSE_ATTR, None) if adapter is not None else None
    if found is not None:
        return found
    return COLLAPSE_LAYERS.get(getattr(adapter, "family", None), DEFAULT_COLLAPSE_LAYER)


@register(
    "entropy",
    needs=("queries",),
    layer=_entropy_layer,
    min_layer=1,
    flops=lambda s, **_: s.n * 2 * s.heads * s.heads * s.head_dim,
    description="top-k matrix entropy of per-head queries",
)
def entropy_select(inputs: SelectionInputs, k: int, normalize: bool = False) -> torch.Tensor:
    """EntropyPrune: the ``k`` tokens with the highest query-state entropy at layer K-1.

    queries: [batch, N, H, d_head]. Returns [batch, k] (ascending). Ties break towards the earlier token.
    ``normalize``: see ``entropy_scores`` (False, the default, is the released score).
    """
    if inputs.queries is None:
        raise ValueError("entropy needs inputs.queries ([batch, N, H, d_head]); got None")
    scores = entropy_scores(inputs.queries, normalize)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values


def matrix_entropy(x: torch.Tensor) -> float:
    """Normalised matrix entropy of a set of token representations x: [N, D], in [0, 1].

    Tokens are centred (the shared mean direction carries no diversity) and scaled to unit norm (hidden-state
    norms grow with depth and a few tokens have outsized norms), so Gram = X X^T / N has trace 1; the entropy
    of its eigenvalues (float64) is divided by log(min(N, D)). 0 = all tokens alike, 1 = isotropic.
    """
    if x.dim() != 2 or min(x.shape) < 2:
        raise ValueError(f"x must be [N, D] with N >= 2 and D >= 2; got shape {tuple(x.shape)}")
    n, d = x.shape
    x = x.double()
    x = torch.nn.functional.normalize(x - x.mean(dim=0), dim=-1)
    # Same non-zero spectrum either way; use the smaller side.
    gram = x @ x.T if n <= d else x.T @ x
    return float(_spectral_entropy(gram / n, math.log(min(n, d))))


def collapse_layer(entropies: list[float]) -> int:
    """The layer after the sharpest entropy drop: i + 1 for the largest entropies[i] - entropies[i+1].

    ``entropies[l]`` is the entropy of the visual tokens entering decoder layer l (``hidden_states[l]``), so a
    drop between l and l+1 happens inside layer l and pruning at layer l + 1 (scoring with layer l's queries)
    comes right after it. Ties go to the earliest drop.
    """
    if len(entropies) < 2:
        raise ValueError(f"need at least 2 per-layer entropies; got {len(entropies)}")
    drops = [entropies[i] - entropies[i + 1] for i in range(len(entropies) - 1)]
    return max(range(len(drops)), key=lambda i: (drops[i], -i)) + 1
