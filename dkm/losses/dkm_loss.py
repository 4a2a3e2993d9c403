"""DKM's training loss: per-scale warp regression + certainty BCE, with local masking."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.warp import gt_warp


class DKMLoss(nn.Module):
    """Sum over scales of ``ce_weight * BCE(certainty, valid) + mean ||warp - gt|| over valid``.

    At scales ``<= local_largest_scale`` a pixel only counts as valid if the previous (coarser)
    scale's error there, nearest-upsampled, is below ``(2 / local_norm) * local_dist * scale``: the
    fine scales should not be punished for coarse mistakes, only learn to flag them as uncertain.

    Args:
        ce_weight: weight of the certainty BCE (0.01 in the recipe).
        local_loss, local_dist, local_largest_scale: the local masking (on, 4, 8 in the recipe).
        local_norm: the resolution the threshold is expressed at (the reference hard-codes 512).
    """

    def __init__(self, ce_weight: float = 0.01, local_loss: bool = True, local_dist: float = 4.0,
                 local_largest_scale: int = 8, local_norm: float = 512.0):
        super().__init__()
        self.ce_weight = ce_weight
        self.local_loss = local_loss
        self.local_dist = local_dist
        self.local_largest_scale = local_largest_scale
        self.local_norm = local_norm

    def forward(self, dense_corresps: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """``dense_corresps``: the model output ``{scale: {"dense_flow": (B, 2, h, w),
        "dense_certainty": (B, 1, h, w)}}`` (in the order the scales should be visited, coarse first);
        ``batch``: ground truth in either form of :func:`~dkm.geometry.warp.gt_warp`.

        Returns the total loss (a scalar) and a dict of per-scale terms (detached): ``ce_{s}``,
        ``regression_{s}``, ``valid_{s}`` (fraction of supervised pixels).
        """
        total = 0.0
        prev_err = None
        logs = {}
        for scale, out in dense_corresps.items():
            flow = out["dense_flow"].permute(0, 2, 3, 1)
            certainty = out["dense_certainty"]
            h, w = flow.shape[1:3]
            with torch.no_grad():
                gt, valid = gt_warp(batch, h, w)
            err = (flow - gt).norm(dim=-1)  # float64, as the reference
            prob = valid.to(certainty.dtype)
            if self.local_loss and scale <= self.local_largest_scale and prev_err is not None:
                near = F.interpolate(prev_err[:, None], size=(h, w), mode="nearest")[:, 0]
                prob = prob * (near < (2 / self.local_norm) * (self.local_dist * scale))
            ce = F.binary_cross_entropy_with_logits(certainty[:, 0], prob)
            sel = prob > 0
            regression = err[sel].mean() if bool(sel.any()) else (err * 0.0).mean()
            total = total + self.ce_weight * ce + regression
            prev_err = err.detach()
            logs[f"ce_{scale}"] = ce.detach()
            logs[f"regression_{scale}"] = regression.detach()
            logs[f"valid_{scale}"] = sel.float().mean().detach()
        return total, logs
