"""Sparse match sampling from a dense warp: weighted sampling without replacement and DKMv3's
"threshold_balanced" mode (kernel-density balancing), chunked and seedable on any device.

Modes (``RegressionMatcher.sample_mode``), as the releases define them:

* ``"proportional"`` (v11): probability proportional to certainty.
* ``"threshold"``: certainties above ``thresh`` count as 1, the others keep their value.
* ``"pow"``: certainty ** (1/3); ``"naive"``: uniform.
* ``<mode>_balanced`` (DKMv3 default ``"threshold_balanced"``): draw ``4 * num`` candidates as above,
  estimate the density of each candidate among the candidates with a Gaussian kernel (std 0.1) in
  the 4-D match space, and draw ``num`` of them with probability ``1 / (density + 1)`` (``1e-7``
  where the density is below 10: isolated matches are nearly never kept).
"""
from __future__ import annotations

import torch

BASE_MODES = ("proportional", "threshold", "pow", "naive")
SAMPLE_MODES = BASE_MODES + tuple(f"{m}_balanced" for m in BASE_MODES)


def weighted_sample(weights: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of ``min(num, #positive weights)`` draws without replacement with probability
    proportional to ``weights`` (N,) (Gumbel-top-k: any size, any device, seedable)."""
    n = min(int(num), int((weights > 0).sum()))
    gen_device = generator.device if generator is not None else weights.device
    u = torch.rand(weights.shape, generator=generator, device=gen_device, dtype=torch.float64).to(weights.device)
    keys = weights.double().log() - (-u.clamp_min(1e-300).log()).log()
    return keys.topk(n).indices


def threshold_weights(certainty: torch.Tensor, thresh: float = 0.05) -> torch.Tensor:
    """DKMv3: certainties above ``thresh`` count as 1, the others keep their value."""
    return torch.where(certainty > thresh, torch.ones_like(certainty), certainty)


def mode_weights(certainty: torch.Tensor, mode: str, thresh: float = 0.05) -> torch.Tensor:
    """Stage-1 sampling weights of ``mode`` (see the module docstring)."""
    base = mode.removesuffix("_balanced")
    if base == "threshold":
        return threshold_weights(certainty, thresh)
    if base == "pow":
        return certainty ** (1 / 3)
    if base == "naive":
        return torch.ones_like(certainty)
    if base == "proportional":
        return certainty
    raise ValueError(f"unknown sample mode {mode!r}; expected one of {SAMPLE_MODES}")


def kde_density(x: torch.Tensor, std: float = 0.1, at: torch.Tensor | None = None,
                max_elements: int = 1 << 22) -> torch.Tensor:
    """Gaussian kernel density ``sum_j exp(-|a_i - x_j|^2 / (2 std^2))`` of points ``x`` (N, D) at
    points ``a = at`` (M, D) (default ``x`` itself, self included), on ``x``'s device.

    Computed a block of rows at a time (at most ``max_elements`` distances per block; never the
    M x N matrix, which the release built at once: 40000 candidates = 6 GiB). Squared distances come
    from one matrix product ``[a, |a|^2, 1] . [-2x, 1, |x|^2]`` clamped at 0, as ``torch.cdist``
    computes them for large inputs. Returns (M,).
    """
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.float()
    a = x if at is None else torch.as_tensor(at, device=x.device).to(x.dtype)
    n, m = x.shape[0], a.shape[0]
    a_sq, x_sq = (a * a).sum(-1, keepdim=True), (x * x).sum(-1, keepdim=True)
    lhs = torch.cat((a, a_sq, torch.ones_like(a_sq)), dim=1)
    rhs = torch.cat((-2 * x, torch.ones_like(x_sq), x_sq), dim=1).T.contiguous()
    rows = max(1, min(m, int(max_elements) // max(n, 1)))
    out = torch.empty(m, dtype=x.dtype, device=x.device)
    buf = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    scale = -1.0 / (2 * std**2)
    for i in range(0, m, rows):
        block = lhs[i:i + rows]
        d2 = buf[: block.shape[0]]
        torch.mm(block, rhs, out=d2)
        out[i:i + rows] = d2.clamp_min_(0).mul_(scale).exp_().sum(dim=-1)
    return out


def balance_probabilities(density: torch.Tensor, min_density: float = 10.0, floor: float = 1e-7) -> torch.Tensor:
    """``1 / (density + 1)``, and ``floor`` where fewer than ``min_density`` neighbours support a match."""
    p = 1 / (density + 1)
    return torch.where(density < min_density, torch.full_like(p, floor), p)


def sample_matches(matches: torch.Tensor, certainty: torch.Tensor, num: int, mode: str, thresh: float = 0.05,
                   generator: torch.Generator | None = None, expansion: int = 4, kde_std: float = 0.1):
    """Sample ``(n, 4)`` matches and their indices from flat ``matches`` (N, 4) and ``certainty`` (N,)
    following ``mode``. Returns ``(indices (n,), weights (N,))``: indices into the inputs, and the
    stage-1 weights (for inspection)."""
    if mode not in SAMPLE_MODES:
        raise ValueError(f"unknown sample mode {mode!r}; expected one of {SAMPLE_MODES}")
    weights = mode_weights(certainty, mode, thresh)
    balanced = mode.endswith("_balanced")
    idx = weighted_sample(weights, expansion * num if balanced else num, generator)
    if not balanced:
        return idx, weights
    p = balance_probabilities(kde_density(matches[idx], std=kde_std))
    return idx[weighted_sample(p, num, generator)], weights
