"""Pictures of dense warps (the support image pulled back onto the query, weighted by certainty) and
of sparse matches (lines between two images side by side)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .utils.image import IMAGENET_MEAN, IMAGENET_STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) ImageNet-normalized -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x * std + mean).clamp(0, 1)


def warp_support(support: torch.Tensor, warp: torch.Tensor) -> torch.Tensor:
    """``support`` (3, Hs, Ws) sampled at ``warp`` (H, W, 2) normalized -> (3, H, W)."""
    return F.grid_sample(support[None], warp[None].to(support.dtype), mode="bilinear", align_corners=False)[0]


def warp_panel(query: torch.Tensor, support: torch.Tensor, warp: torch.Tensor, certainty: torch.Tensor,
               gt_warp: torch.Tensor | None = None, gt_valid: torch.Tensor | None = None) -> np.ndarray:
    """One row: query | support | support warped by the prediction (x certainty) | certainty
    [| support warped by the ground truth (x validity)]. Inputs normalized images (3, H, W),
    ``warp`` (H, W, 2), ``certainty`` (H, W) in [0, 1]. Returns (H, k*W, 3) uint8."""
    q, s = denormalize(query.float()), denormalize(support.float())
    h, w = q.shape[-2:]
    up = lambda t: F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False)[0]  # noqa: E731
    warp = up(warp.permute(2, 0, 1).float()).permute(1, 2, 0)
    cert = up(certainty[None].float())
    tiles = [q, F.interpolate(s[None], size=(h, w), mode="bilinear", align_corners=False)[0],
             warp_support(s, warp) * cert, cert.expand(3, -1, -1)]
    if gt_warp is not None:
        gw = up(gt_warp.permute(2, 0, 1).float()).permute(1, 2, 0)
        gv = up(gt_valid[None].float()) if gt_valid is not None else torch.ones_like(cert)
        tiles.append(warp_support(s, gw) * gv)
    row = torch.cat(tiles, dim=-1)
    return (row.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def draw_matches(im_A: np.ndarray, im_B: np.ndarray, kpts_A: np.ndarray, kpts_B: np.ndarray,
                 certainty: np.ndarray | None = None, max_lines: int = 300, seed: int = 0,
                 center: float = 0.5) -> np.ndarray:
    """``im_A`` (H_A, W_A, 3) and ``im_B`` (H_B, W_B, 3) uint8 side by side (top-aligned), with a line
    for each of at most ``max_lines`` matches ``kpts_A[i] <-> kpts_B[i]`` ((N, 2) pixel coordinates
    with pixel i's centre at ``i + center``, as :func:`~dkm.geometry.coords.normalized_to_pixel`
    gives them; default 0.5), coloured from red (low certainty) to green (high).
    Returns (max(H_A, H_B), W_A + W_B, 3) uint8."""
    import cv2

    kpts_A, kpts_B = np.asarray(kpts_A, dtype=np.float64), np.asarray(kpts_B, dtype=np.float64)
    if kpts_A.shape != kpts_B.shape or kpts_A.ndim != 2 or kpts_A.shape[1] != 2:
        raise ValueError(f"draw_matches: kpts_A and kpts_B must both be (N, 2), got {kpts_A.shape} and {kpts_B.shape}")
    (ha, wa), (hb, wb) = im_A.shape[:2], im_B.shape[:2]
    canvas = np.zeros((max(ha, hb), wa + wb, 3), dtype=np.uint8)
    canvas[:ha, :wa], canvas[:hb, wa:] = im_A, im_B
    n = len(kpts_A)
    idx = np.random.default_rng(seed).choice(n, min(n, max_lines), replace=False) if n else np.zeros(0, int)
    c = np.ones(n) if certainty is None else np.clip(np.asarray(certainty, dtype=np.float64).reshape(-1), 0, 1)
    for i in idx:
        a = tuple(int(round(v)) for v in kpts_A[i] - center)  # to the integer pixel grid of cv2's drawing
        b = tuple(int(round(v)) for v in kpts_B[i] - center + (wa, 0))
        color = (int(255 * (1 - c[i])), int(255 * c[i]), 0)
        cv2.line(canvas, a, b, color, 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 2, color, -1, cv2.LINE_AA)
        cv2.circle(canvas, b, 2, color, -1, cv2.LINE_AA)
    return canvas
