"""A classical baseline with the matcher interface the benchmarks accept: OpenCV SIFT with Lowe's
ratio test and (optionally) mutual nearest neighbours. Lets a user validate a dataset tree and the
benchmark protocols without GPUs or weights."""
from __future__ import annotations

import cv2
import numpy as np

from ..geometry.coords import DEFAULT_CENTER, normalized_to_pixel, pixel_to_normalized
from ..utils.image import load_image


class SiftMatcher:
    """Sparse matcher: ``match_sparse(im1, im2) -> (matches (N, 4) normalized, scores (N,))``.

    Args:
        num_features: SIFT keypoints per image (0 = all).
        ratio: Lowe's ratio-test threshold.
        mutual: keep only mutual nearest neighbours.
        max_size: images larger than this (longest side) are downscaled for detection.
    """

    def __init__(self, num_features: int = 8000, ratio: float = 0.8, mutual: bool = True, max_size: int | None = 1600,
                 h: int | None = None, w: int | None = None):
        self.num_features, self.ratio, self.mutual, self.max_size = num_features, ratio, mutual, max_size
        # precise upscaling: keypoints on OpenCV's integer pixel centres (its default shifts them by 0.25 px)
        self.sift = cv2.SIFT_create(nfeatures=num_features, enable_precise_upscale=True)

    def _detect(self, im):
        gray = np.asarray(load_image(im).convert("L"))
        h, w = gray.shape
        scale = np.ones(2)
        if self.max_size and max(h, w) > self.max_size:
            s = self.max_size / max(h, w)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
            scale = np.array(size, dtype=np.float64) / (w, h)  # per axis: each side is rounded on its own
        kps, desc = self.sift.detectAndCompute(gray, None)
        pts = np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2)
        # OpenCV puts pixel centres on integers; map back to full-resolution pixels
        pts = (pts + 0.5) / scale - 0.5
        return pts, desc, (h, w)

    def match_sparse(self, im1, im2):
        """Sparse matches of two images (paths or PIL images, any size).

        Returns ``matches (N, 4)`` = ``[x1, y1, x2, y2]`` normalized (:mod:`dkm.geometry.coords`;
        OpenCV keypoints have integer pixel centres, ``center=0.0``) and ``scores (N,)`` in (0, 1]:
        ``1 - d1 / d2`` of the ratio test (1 when the second neighbour is infinitely worse)."""
        p1, d1, (h1, w1) = self._detect(im1)
        p2, d2, (h2, w2) = self._detect(im2)
        if d1 is None or d2 is None or len(d1) < 2 or len(d2) < 2:
            return np.zeros((0, 4)), np.zeros(0)
        bf = cv2.BFMatcher(cv2.NORM_L2)
        knn = bf.knnMatch(d1, d2, k=2)
        fwd = {m.queryIdx: (m.trainIdx, m.distance / max(n.distance, 1e-12))
               for m, n in (p for p in knn if len(p) == 2) if m.distance < self.ratio * n.distance}
        if self.mutual:
            back = {m.queryIdx: m.trainIdx for (m,) in (p[:1] for p in bf.knnMatch(d2, d1, k=1) if p)}
            fwd = {i: jr for i, jr in fwd.items() if back.get(jr[0]) == i}
        rows = sorted((i, j, r) for i, (j, r) in fwd.items())
        idx = np.array([(i, j) for i, j, _ in rows], dtype=np.int64).reshape(-1, 2)
        scores = 1.0 - np.array([r for _, _, r in rows], dtype=np.float64)
        a = pixel_to_normalized(p1[idx[:, 0]], h1, w1, center=0.0)
        b = pixel_to_normalized(p2[idx[:, 1]], h2, w2, center=0.0)
        return np.concatenate([a, b], axis=1), scores

    def match(self, im1, im2, *args, check_cycle_consistency: bool = False, **kwargs):
        """The dense matchers' call, answered sparsely: ``(matches (N, 4), certainty (N,))`` as
        :meth:`match_sparse` (SIFT matches are already mutual; the cycle flag is accepted and unused)."""
        return self.match_sparse(im1, im2)

    @staticmethod
    def sample(matches, certainty, num: int = 10000, relative_confidence_threshold: float = 0.0,
               generator=None):
        """Up to ``num`` of the matches (N, 4), without replacement, with probability proportional to
        certainty among those with ``certainty / max > relative_confidence_threshold``; all of them if
        ``num >= N``. ``generator``: a ``torch.Generator`` (or ``numpy`` Generator) for reproducibility."""
        m, c = np.asarray(matches).reshape(-1, 4), np.asarray(certainty, dtype=np.float64).reshape(-1)
        if len(c) == 0:
            return m, c
        keep = (c / c.max() > relative_confidence_threshold) & (c > 0) if c.max() > 0 else np.zeros(len(c), bool)
        m, c = m[keep], c[keep]
        if num >= len(c):
            return m, c
        if isinstance(generator, np.random.Generator):
            rng = generator
        else:
            import torch

            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
            rng = np.random.default_rng(seed)
        idx = rng.choice(len(c), size=int(num), replace=False, p=c / c.sum())
        return m[idx], c[idx]

    @staticmethod
    def to_pixel_coordinates(matches, H_A, W_A, H_B, W_B, center: float = DEFAULT_CENTER):
        return (normalized_to_pixel(matches[..., :2], H_A, W_A, center),
                normalized_to_pixel(matches[..., 2:], H_B, W_B, center))

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self
