"""Ground-truth warps: from depth + intrinsics + relative pose, or from a homography.

Both give the same thing, ``(warp, valid)``: for each query pixel centre of a ``h x w`` grid, the
corresponding support point in normalized coordinates (:mod:`dkm.geometry.coords`) and whether that
correspondence is known. :func:`gt_warp` picks the form from the batch; the loss only sees its output.

Pixel frames: intrinsics ``K`` and homographies ``H_1to2`` are in pixels of their images with pixel
centres at ``i + 0.5`` (``center=0.5``, the DKM training convention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .coords import normalized_grid, normalized_to_pixel, pixel_to_normalized

CENTER = 0.5  # pixel-centre offset of K and H in the training data (see module docstring)


def _sample(img: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Bilinear, zero-padded sample of ``img`` (B, H, W) at normalized ``pts`` (B, L, 2) -> (B, L)."""
    return F.grid_sample(img[:, None], pts[:, :, None], mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0, :, 0]


def affine_inverse(K: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of (B, 3, 3) matrices with last row ``[0, 0, 1]`` (intrinsics, possibly
    composed with an in-plane augmentation). Avoids batched ``torch.linalg.inv``, which is unreliable
    on some CPU builds (pytorch#142815)."""
    a, b, c, d = K[:, 0, 0], K[:, 0, 1], K[:, 1, 0], K[:, 1, 1]
    det = a * d - b * c
    A_inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[:, None, None]
    t = -A_inv @ K[:, :2, 2:]
    bottom = torch.zeros_like(K[:, 2:, :])
    bottom[:, 0, 2] = 1
    return torch.cat([torch.cat([A_inv, t], -1), bottom], -2)


def warp_kpts(kpts: torch.Tensor, depth0: torch.Tensor, depth1: torch.Tensor, T_0to1: torch.Tensor,
              K0: torch.Tensor, K1: torch.Tensor, rel_depth_tol: float = 0.05):
    """Warp normalized query points into the support image through depth and relative pose.

    Semantics of the DKM training code (LoFTR-derived): query depth sampled bilinearly with zero
    padding; unprojection with ``K0``; rigid motion ``T_0to1`` (world-to-camera convention,
    ``X1 = R X0 + t``); projection with ``K1`` dividing by ``z + 1e-4``; strictly inside
    ``(0, W-1) x (0, H-1)`` in pixels (the last row/column excluded, as the reference does); the support
    depth sampled at the warped point must agree with the transformed depth within
    ``rel_depth_tol`` (relative).

    Args:
        kpts: (B, L, 2) normalized query points.
        depth0, depth1: (B, H0, W0), (B, H1, W1) depth maps, 0 = unknown.
        T_0to1: (B, 4, 4) or (B, 3, 4); K0, K1: (B, 3, 3) intrinsics (last row ``[0, 0, 1]``).
    Returns:
        valid (B, L) bool and warped (B, L, 2) normalized support points.
    """
    h0, w0 = depth0.shape[-2:]
    h1, w1 = depth1.shape[-2:]
    d0 = _sample(depth0, kpts)
    uv = normalized_to_pixel(kpts, h0, w0, CENTER)
    xyz = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1) * d0[..., None]  # (B, L, 3)
    cam0 = affine_inverse(K0) @ xyz.transpose(1, 2)  # (B, 3, L)
    cam1 = T_0to1[:, :3, :3] @ cam0 + T_0to1[:, :3, 3:4]
    z1 = cam1[:, 2]
    proj = (K1 @ cam1).transpose(1, 2)  # (B, L, 3)
    uv1 = proj[..., :2] / (proj[..., 2:] + 1e-4)
    inside = (uv1[..., 0] > 0) & (uv1[..., 0] < w1 - 1) & (uv1[..., 1] > 0) & (uv1[..., 1] < h1 - 1)
    warped = pixel_to_normalized(uv1, h1, w1, CENTER)
    d1 = _sample(depth1, warped)
    consistent = ((d1 - z1) / d1).abs() < rel_depth_tol
    return (d0 != 0) & inside & consistent, warped


def warp_homography(kpts: torch.Tensor, H_1to2: torch.Tensor, hw0: tuple[int, int], hw1: tuple[int, int]):
    """Warp normalized query points (B, L, 2) by ``H_1to2`` (B, 3, 3) (query pixels -> support pixels,
    pixel centres at ``i + 0.5``). Valid where the point lands strictly inside the support image
    (in front of the homography's horizon)."""
    uv = normalized_to_pixel(kpts, *hw0, CENTER)
    p = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1) @ H_1to2.transpose(1, 2)
    z = p[..., 2:]
    uv1 = p[..., :2] / torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
    warped = pixel_to_normalized(uv1, *hw1, CENTER)
    valid = (z[..., 0] > 0) & (warped.abs() < 1).all(dim=-1)
    return valid, warped


def gt_warp(batch: dict, h: int, w: int, dtype=torch.float64):
    """Ground truth for a ``h x w`` grid of query pixel centres from either form in ``batch``.

    ``batch`` holds ``query_depth``, ``support_depth``, ``K1``, ``K2``, ``T_1to2`` (depth form) or
    ``H_1to2`` with the ``query``/``support`` images (homography form). Computed in ``dtype``
    (float64, as the reference loss does).

    Returns:
        warp (B, h, w, 2) normalized support coordinates and valid (B, h, w) bool.
    """
    if "H_1to2" in batch:
        H = batch["H_1to2"]
        b = H.shape[0]
        grid = normalized_grid(h, w, device=H.device, dtype=dtype, batch=b).reshape(b, h * w, 2)
        valid, warped = warp_homography(grid, H.to(dtype), tuple(batch["query"].shape[-2:]),
                                        tuple(batch["support"].shape[-2:]))
    elif "query_depth" in batch:
        d0 = batch["query_depth"]
        b = d0.shape[0]
        grid = normalized_grid(h, w, device=d0.device, dtype=dtype, batch=b).reshape(b, h * w, 2)
        valid, warped = warp_kpts(grid, d0.to(dtype), batch["support_depth"].to(dtype),
                                  batch["T_1to2"].to(dtype), batch["K1"].to(dtype), batch["K2"].to(dtype))
    else:
        raise KeyError("batch has no ground truth: expected 'H_1to2' or 'query_depth'/'support_depth'/"
                       f"'K1'/'K2'/'T_1to2'; got keys {sorted(batch)}")
    return warped.reshape(b, h, w, 2), valid.reshape(b, h, w)
