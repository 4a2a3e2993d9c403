"""The one coordinate convention of this project.

Every dense prediction, warp and match in ``dkm`` is expressed in *normalized image coordinates*
``(x, y)`` in ``[-1, 1]``, with ``x`` along the width and ``y`` along the height, and the centre of
pixel column ``j`` of an image of width ``W`` at::

    x_j = -1 + (2 j + 1) / W          (PyTorch ``grid_sample(..., align_corners=False)``)

and likewise for rows. ``-1`` and ``+1`` are the outer *edges* of the first and last pixel.

Conversion to pixels happens only through :func:`normalized_to_pixel` /
:func:`pixel_to_normalized`. Their ``center`` argument is the pixel coordinate of the centre of
pixel 0:

* ``center=0.5`` (default): continuous "corner" frame, pixel ``j`` covers ``[j, j+1)`` and its
  centre is at ``j + 0.5``. This is the frame of the DKM training geometry (intrinsics ``K`` in
  pixels under this convention) and of DKMv3's ``to_pixel_coordinates``: ``u = W (x + 1) / 2``.
* ``center=0.0``: OpenCV / HPatches frame, pixel centres on integers: ``u = W (x + 1) / 2 - 0.5``.

Benchmark protocols that used a particular offset name it in their config and pass it here.
"""
from __future__ import annotations

import torch

__all__ = ["normalized_grid", "normalized_to_pixel", "pixel_to_normalized", "DEFAULT_CENTER"]

DEFAULT_CENTER = 0.5


def normalized_grid(
    h: int, w: int, *, device=None, dtype=torch.float32, batch: int | None = None
) -> torch.Tensor:
    """Normalized coordinates of the pixel centres of an ``h x w`` image.

    Returns ``(h, w, 2)`` (or ``(batch, h, w, 2)``) with ``[..., 0] = x`` and ``[..., 1] = y``.
    """
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=device, dtype=dtype)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack((xx, yy), dim=-1)
    if batch is not None:
        grid = grid[None].expand(batch, h, w, 2)
    return grid


def _scale(h, w, like):
    if isinstance(like, torch.Tensor):
        return torch.tensor([w, h], dtype=like.dtype, device=like.device)
    import numpy as np

    return np.array([w, h], dtype=np.asarray(like).dtype if np.asarray(like).dtype.kind == "f" else np.float64)


def normalized_to_pixel(xy, h: int, w: int, center: float = DEFAULT_CENTER):
    """Convert normalized ``(..., 2)`` coordinates to pixels of an ``h x w`` image.

    Works on tensors and numpy arrays. ``center`` is the pixel coordinate of pixel 0's centre.
    """
    s = _scale(h, w, xy)
    return (xy + 1) * s / 2 - (0.5 - center)


def pixel_to_normalized(uv, h: int, w: int, center: float = DEFAULT_CENTER):
    """Inverse of :func:`normalized_to_pixel`."""
    s = _scale(h, w, uv)
    return 2 * (uv + (0.5 - center)) / s - 1
