"""Loading and augmenting one training pair (shared by the MegaDepth and ScanNet datasets)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..utils.image import pil_to_tensor


DEPTH_INTERPOLATIONS = ("bilinear", "nearest")


def resize_depth(depth: torch.Tensor, h: int, w: int, mode: str = "bilinear") -> torch.Tensor:
    """(H, W) depth -> (h, w).

    ``mode="bilinear"`` is the published recipe (torchvision ``Resize`` on a tensor, no antialiasing):
    near holes it blends valid depths with the zeros of invalid pixels, and the depth-consistency
    test of :func:`~dkm.geometry.warp.warp_kpts` rejects most of those blends. ``"nearest"`` never
    mixes valid and invalid depths.
    """
    if mode not in DEPTH_INTERPOLATIONS:
        raise ValueError(f"depth_interpolation must be one of {DEPTH_INTERPOLATIONS}, got {mode!r}")
    kw = {"align_corners": False, "antialias": False} if mode == "bilinear" else {}
    return F.interpolate(depth[None, None].float(), size=(h, w), mode=mode, **kw)[0, 0]


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> torch.Tensor:
    """Intrinsics of an image resized by ``(sx, sy)`` (pixel-centre-at-0.5 frame)."""
    S = np.diag([sx, sy, 1.0])
    return torch.from_numpy(S @ np.asarray(K, dtype=np.float64)).float()


def shift_image(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Translate (..., H, W) content by integer ``(dx, dy)`` pixels, filling with zeros."""
    out = torch.zeros_like(x)
    H, W = x.shape[-2:]
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def make_depth_pair(im1: Image.Image, im2: Image.Image, depth1: torch.Tensor, depth2: torch.Tensor,
                    K1, K2, T_1to2, h: int, w: int, shake_t: int = 0, rng: np.random.Generator | None = None,
                    rot_prob: float = 0.0, depth_interpolation: str = "bilinear") -> dict:
    """Resize images (bicubic), depths (``depth_interpolation``, see :func:`resize_depth`) and
    intrinsics to ``h x w``; then the recipe's
    "shake": both images and depths translated by the same random ``t`` in ``[-shake_t, shake_t]^2``
    pixels, with the principal points moved along; optionally an in-plane rotation of the query
    (kornia, probability ``rot_prob``) folded into ``K1``."""
    K1 = scale_intrinsics(K1, w / im1.width, h / im1.height)
    K2 = scale_intrinsics(K2, w / im2.width, h / im2.height)
    q, s = pil_to_tensor(im1, (h, w)), pil_to_tensor(im2, (h, w))
    d1, d2 = resize_depth(depth1, h, w, depth_interpolation), resize_depth(depth2, h, w, depth_interpolation)
    if shake_t > 0:
        rng = rng or np.random.default_rng()
        dx, dy = (int(v) for v in rng.integers(-shake_t, shake_t + 1, size=2))
        q, s, d1, d2 = (shift_image(x, dx, dy) for x in (q, s, d1, d2))
        K1[:2, 2] += torch.tensor([dx, dy], dtype=K1.dtype)
        K2[:2, 2] += torch.tensor([dx, dy], dtype=K2.dtype)
    if rot_prob > 0 and (rng or np.random.default_rng()).random() < rot_prob:
        import kornia.geometry.transform as KG

        angle = torch.tensor([float((rng or np.random.default_rng()).uniform(-90, 90))])
        center = torch.tensor([[(w - 1) / 2, (h - 1) / 2]])
        M = KG.get_rotation_matrix2d(center, angle, torch.ones(1, 2))  # (1, 2, 3), integer-centre pixels
        q = KG.warp_affine(q[None], M, (h, w), align_corners=True)[0]
        d1 = KG.warp_affine(d1[None, None], M, (h, w), mode="nearest", align_corners=True)[0, 0]
        # in the 0.5-centre frame the same map is shift(-0.5) o M o shift(+0.5)
        A = torch.eye(3)
        A[:2] = M[0]
        sh = torch.eye(3)
        sh[:2, 2] = 0.5
        K1 = (sh @ A @ torch.linalg.inv(sh)) @ K1
    return {"query": q, "support": s, "query_depth": d1, "support_depth": d2, "K1": K1, "K2": K2,
            "T_1to2": torch.as_tensor(np.asarray(T_1to2, dtype=np.float32))}
