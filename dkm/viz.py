"""Pictures of dense warps: the support image pulled back onto the query, weighted by certainty."""
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
