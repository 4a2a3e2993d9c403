"""Homography estimation from matches and the HPatches mean corner error."""
from __future__ import annotations

import cv2
import numpy as np


def estimate_homography(kpts0: np.ndarray, kpts1: np.ndarray, thresh_px: float, conf: float = 0.99999,
                        return_inliers: bool = False):
    """OpenCV RANSAC homography mapping ``kpts0`` (N, 2) to ``kpts1`` (N, 2) pixels.

    Returns ``H`` (3, 3), or ``(H, inlier mask (N,) bool)`` with ``return_inliers``; ``None`` if
    there are fewer than 4 points or OpenCV finds no model. OpenCV's own errors propagate (the
    HPatches benchmark treats them as the release does: no homography)."""
    if len(kpts0) < 4:
        return None
    H, mask = cv2.findHomography(np.asarray(kpts0, np.float64), np.asarray(kpts1, np.float64),
                                 method=cv2.RANSAC, ransacReprojThreshold=thresh_px, confidence=conf)
    if H is None:
        return None
    if return_inliers:
        inl = np.zeros(len(kpts0), bool) if mask is None else mask.ravel() > 0
        return H, inl
    return H


def image_corners(h: int, w: int) -> np.ndarray:
    """The four corner pixel centres of an ``h x w`` image in the integer-centre frame (4, 2):
    ``(0, 0), (0, h-1), (w-1, 0), (w-1, h-1)``."""
    return np.array([[0, 0], [0, h - 1], [w - 1, 0], [w - 1, h - 1]], dtype=np.float64)


def apply_homography(H: np.ndarray, pts: np.ndarray) -> np.ndarray:
    p = np.c_[pts, np.ones(len(pts))] @ np.asarray(H, np.float64).T
    return p[:, :2] / p[:, 2:]


def mean_corner_error(H_est: np.ndarray, H_gt: np.ndarray, h: int, w: int) -> float:
    """Mean distance between image-1 corners mapped by the estimated and true homographies."""
    c = image_corners(h, w)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.linalg.norm(apply_homography(H_est, c) - apply_homography(H_gt, c), axis=1)
    d = np.where(np.isfinite(d), d, np.inf)
    return float(np.mean(d))
