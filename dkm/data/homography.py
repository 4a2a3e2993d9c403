"""Synthetic homography pairs from ordinary photographs (ground truth ``H_1to2``).

Used by the embedded quickstart: the photographs bundled with scikit-image, some held out for
evaluation (written as an HPatches-format tree so the HPatches benchmark code evaluates them).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..utils.image import pil_to_tensor

#: scikit-image sample images used for training / held out for evaluation (all bundled, no download).
SKIMAGE_TRAIN = ("astronaut", "brick", "camera", "cell", "clock", "coins", "grass", "gravel", "hubble_deep_field",
                 "immunohistochemistry", "moon", "page", "retina", "text")
SKIMAGE_HELDOUT = ("coffee", "chelsea", "rocket")


def skimage_images(names) -> list[np.ndarray]:
    """RGB uint8 arrays of scikit-image sample images by name."""
    from skimage import data

    out = []
    for n in names:
        im = np.asarray(getattr(data, n)())
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=-1)
        out.append(np.ascontiguousarray(im[..., :3]))
    return out


def random_homography(rng: np.random.Generator, h: int, w: int, strength: float = 0.15,
                      max_rotation_deg: float = 10.0) -> np.ndarray:
    """A homography (integer-centre pixels of an ``h x w`` image) from a random rotation about the
    centre followed by independent corner offsets of up to ``strength * (w, h)``."""
    src = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
    a = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = (src - c) @ R.T + c + rng.uniform(-strength, strength, (4, 2)) * np.array([w, h])
    return cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32)).astype(np.float64)


def to_center_half(H: np.ndarray) -> np.ndarray:
    """The same homography in the pixel frame with centres at ``i + 0.5`` (the training convention)."""
    S = np.array([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    return S @ H @ np.linalg.inv(S)


def random_crop(rng, im: np.ndarray, aspect: float, min_frac: float = 0.5) -> np.ndarray:
    """A random crop with the given width/height aspect covering at least ``min_frac`` of a side."""
    H, W = im.shape[:2]
    ch = int(min(H, W / aspect) * rng.uniform(min_frac, 1.0))
    cw = int(ch * aspect)
    y, x = rng.integers(0, H - ch + 1), rng.integers(0, W - cw + 1)
    return im[y:y + ch, x:x + cw]


class SyntheticHomographyDataset(Dataset):
    """Each item: a random crop of an image resized to ``h x w`` (query), its warp by a random
    homography (support), and ``H_1to2`` (query -> support, pixel centres at ``i + 0.5``).

    ``length`` items per epoch; item ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``.
    """

    def __init__(self, images: list[np.ndarray], h: int, w: int, length: int = 1000, strength: float = 0.15,
                 max_rotation_deg: float = 10.0, photometric: float = 0.1, seed: int = 0):
        if not images:
            raise ValueError("SyntheticHomographyDataset needs at least one image")
        self.images, self.h, self.w, self.length = images, h, w, length
        self.strength, self.max_rotation_deg, self.photometric = strength, max_rotation_deg, photometric
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        k = int(rng.integers(len(self.images)))
        crop = random_crop(rng, self.images[k], self.w / self.h)
        q = cv2.resize(crop, (self.w, self.h), interpolation=cv2.INTER_AREA)
        H = random_homography(rng, self.h, self.w, self.strength, self.max_rotation_deg)
        s = cv2.warpPerspective(q, H, (self.w, self.h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        if self.photometric > 0:
            gain, bias = rng.uniform(1 - self.photometric, 1 + self.photometric), rng.uniform(-20, 20) * self.photometric
            s = np.clip(s.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
        return {"query": pil_to_tensor(Image.fromarray(q)), "support": pil_to_tensor(Image.fromarray(s)),
                "H_1to2": torch.from_numpy(to_center_half(H)).float(), "pair_id": f"img{k}/{self.epoch}/{i}"}


def write_hpatches_tree(images: list[np.ndarray], names, root, hw=(480, 640), seed: int = 0,
                        strength: float = 0.15, max_rotation_deg: float = 10.0) -> Path:
    """Held-out evaluation pairs as an HPatches tree: ``<root>/hpatches-sequences-release/v_<name>/``
    with ``1.ppm``, ``2..6.ppm`` and ``H_1_k`` (integer pixel centres, as HPatches)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = hw
    for im, name in zip(images, names):
        d = root / "hpatches-sequences-release" / f"v_{name}"
        d.mkdir(parents=True, exist_ok=True)
        base = cv2.resize(random_crop(rng, im, w / h, min_frac=1.0), (w, h), interpolation=cv2.INTER_AREA)
        Image.fromarray(base).save(d / "1.ppm")
        for k in range(2, 7):
            H = random_homography(rng, h, w, strength, max_rotation_deg)
            Image.fromarray(cv2.warpPerspective(base, H, (w, h), flags=cv2.INTER_LINEAR)).save(d / f"{k}.ppm")
            np.savetxt(d / f"H_1_{k}", H)
    return root
