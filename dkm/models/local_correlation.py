"""Local correlation volumes of DKMv3's refiners.

For every query pixel, the dot products (divided by ``sqrt(C)``) between its feature and the support
features on a ``(2r+1) x (2r+1)`` window of support pixels centred on the current flow target
(one pixel apart), sampled bilinearly with zero padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..geometry.coords import normalized_grid


def window_offsets(radius: int, h: int, w: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalized offsets of the ``(2r+1)^2`` window, row-major with ``dy`` outer: ``(K, 2)`` as ``(dx, dy)``.

    One step is one pixel of an ``h x w`` image (``2/w`` in x, ``2/h`` in y)."""
    n = 2 * radius + 1
    dy = torch.linspace(-2 * radius / h, 2 * radius / h, n, device=device, dtype=dtype)
    dx = torch.linspace(-2 * radius / w, 2 * radius / w, n, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(dy, dx, indexing="ij")
    return torch.stack((xx, yy), dim=-1).reshape(n * n, 2)


def local_correlation(feat0: torch.Tensor, feat1: torch.Tensor, radius: int, flow: torch.Tensor | None = None,
                      chunk: int | None = None, rows: int | None = None) -> torch.Tensor:
    """Correlation of ``feat0`` with a window of ``feat1`` around ``flow``.

    Args:
        feat0, feat1: (B, C, h, w) query and support features.
        radius: window radius ``r`` (in pixels of the ``h x w`` grid).
        flow: (B, 2, h, w) normalized support positions of the window centres; ``None`` = identity.
        chunk: number of window offsets sampled per ``grid_sample`` call; ``None`` = all at once
            with an einsum, operation for operation as the release (a (B, C, h, w, K) intermediate).
            With ``chunk`` the memory is bounded by ``B * C * h * w * chunk`` elements (and the
            products run as one batched matmul per chunk, which is faster on CPU).
        rows: with ``chunk``, the number of query rows per ``grid_sample`` call (``None`` = all ``h``):
            bounds the sampled window to ``B * C * rows * w * chunk`` elements (the same result).

    Returns:
        (B, K, h, w) with ``K = (2r+1)^2``, offsets row-major with ``dy`` outer.
    """
    b, c, h, w = feat0.shape
    if flow is None:
        centres = normalized_grid(h, w, device=feat0.device, dtype=feat0.dtype, batch=b)
    else:
        centres = flow.permute(0, 2, 3, 1)
    offsets = window_offsets(radius, h, w, device=feat0.device, dtype=centres.dtype)
    k = offsets.shape[0]
    feat1 = feat1.to(centres.dtype)
    feat0 = feat0.to(centres.dtype)
    if chunk is None:  # as the release: one (B, C, h, w, K) window tensor and an einsum
        coords = (centres[:, :, :, None] + offsets[None, None, None]).reshape(b, h, w * k, 2)
        window = F.grid_sample(feat1, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.einsum("bchw,bchwk->bkhw", feat0, window.reshape(b, c, h, w, k)) / c ** 0.5
    # Chunks of offsets (and bands of query rows), sampled channels-last (much faster on CPU); per
    # pixel a (1 x C) @ (C x n) product, batched as one bmm.
    chunk, rows = max(1, int(chunk)), h if rows is None else max(1, int(rows))
    query = feat0.permute(0, 2, 3, 1)  # (B, h, w, C), a view when channels-last
    feat1 = feat1.contiguous(memory_format=torch.channels_last)
    out = centres.new_empty(b, h, w, k)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        lhs = query[:, r0:r1].reshape(b * (r1 - r0) * w, 1, c)
        for i in range(0, k, chunk):
            off = offsets[i:i + chunk]
            n = off.shape[0]
            coords = (centres[:, r0:r1, :, None] + off[None, None, None]).reshape(b, r1 - r0, w * n, 2)
            window = F.grid_sample(feat1, coords, mode="bilinear", padding_mode="zeros", align_corners=False)
            window = window.permute(0, 2, 3, 1).reshape(b * (r1 - r0) * w, n, c)  # a view when channels-last
            out[:, r0:r1, :, i:i + n] = torch.bmm(lhs, window.transpose(1, 2)).reshape(b, r1 - r0, w, n)
    return (out / c ** 0.5).permute(0, 3, 1, 2)


def chunk_for_budget(b: int, c: int, h: int, w: int, max_elements: int = 7 << 20, min_chunk: int = 4) -> int:
    """Window offsets per chunk so that one chunk's sampled window holds at most ``max_elements``, but
    at least ``min_chunk`` offsets.

    The budget (28 MiB in float32) keeps windows below glibc's largest mmap threshold (32 MiB), so
    that they are recycled by the heap instead of being mapped, page-faulted and unmapped per chunk.
    The floor exists because grid_sample returns the window channels-first, and the per-pixel matrix
    product over such a window is several times slower with 1 or 2 offsets per pixel than with 4
    (measured on CPU: 7.2 s instead of 1.5 s for DKMv3's stride-8 correlation at 864x1152). Where
    even ``min_chunk`` offsets exceed the budget, :func:`rows_for_budget` splits the query rows."""
    return max(min_chunk, int(max_elements) // max(1, b * c * h * w))


def rows_for_budget(b: int, c: int, w: int, chunk: int, max_elements: int = 7 << 20) -> int:
    """Query rows per ``grid_sample`` call so that a window of ``chunk`` offsets holds at most
    ``max_elements`` (at least one row). DKMv3's outdoor windows at 864x1152 would otherwise hold
    32M elements (127 MB) per call: each one mapped, page-faulted and unmapped by glibc."""
    return max(1, int(max_elements) // max(1, b * c * w * chunk))
