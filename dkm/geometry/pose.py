"""Relative pose: estimation from matches (OpenCV RANSAC as the release, or poselib LO-RANSAC)
and angular errors. Poses map camera-1 to camera-2 coordinates, ``X2 = R X1 + t``."""
from __future__ import annotations

import cv2
import numpy as np


def relative_pose(R1: np.ndarray, t1: np.ndarray, R2: np.ndarray, t2: np.ndarray):
    """From world-to-camera poses ``(R_i, t_i)`` to the relative pose 1 -> 2."""
    R = R2 @ R1.T
    return R, -R @ t1 + t2


def angle_error_mat(R1: np.ndarray, R2: np.ndarray) -> float:
    """Angle of ``R1^T R2`` in degrees."""
    cos = np.clip((np.trace(R1.T @ R2) - 1) / 2, -1.0, 1.0)
    return float(np.rad2deg(np.abs(np.arccos(cos))))


def angle_error_vec(v1: np.ndarray, v2: np.ndarray) -> float:
    """Angle between two vectors in degrees."""
    n = np.linalg.norm(v1) * np.linalg.norm(v2)
    return float(np.rad2deg(np.arccos(np.clip(np.dot(v1, v2) / n, -1.0, 1.0))))


def pose_errors(R_est: np.ndarray, t_est: np.ndarray, R_gt: np.ndarray, t_gt: np.ndarray) -> tuple[float, float]:
    """``(translation error, rotation error)`` in degrees; the translation's sign is ambiguous in an
    essential matrix, so its error is ``min(e, 180 - e)``."""
    e_t = angle_error_vec(np.ravel(t_est), np.ravel(t_gt))
    return min(e_t, 180.0 - e_t), angle_error_mat(R_est, R_gt)


def _normalize(kpts: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixel points (N, 2) -> normalized camera coordinates with ``K`` (principal point and the
    2x2 block; the release's formulation)."""
    return (np.linalg.inv(K[:2, :2]) @ (kpts - K[None, :2, 2]).T).T


def estimate_pose_opencv(kpts0: np.ndarray, kpts1: np.ndarray, K0: np.ndarray, K1: np.ndarray,
                         norm_thresh: float, conf: float = 0.99999):
    """Essential matrix by OpenCV RANSAC on normalized points, then the candidate with most
    ``recoverPose`` inliers (as the DKM release). ``norm_thresh`` is in normalized units.

    Returns ``(R, t (3, 1), inlier mask)`` or ``None`` (fewer than 5 points, or no model)."""
    if len(kpts0) < 5:
        return None
    p0, p1 = _normalize(kpts0, K0), _normalize(kpts1, K1)
    E, mask = cv2.findEssentialMat(p0, p1, np.eye(3), threshold=norm_thresh, prob=conf, method=cv2.RANSAC)
    if E is None:
        return None
    best, ret = 0, None
    for E_i in np.split(E, len(E) // 3):
        n, R, t, _ = cv2.recoverPose(E_i, p0, p1, np.eye(3), 1e9, mask=mask)
        if n > best:
            best, ret = n, (R, t, mask.ravel() > 0)
    return ret


def estimate_pose_poselib(kpts0: np.ndarray, kpts1: np.ndarray, K0: np.ndarray, K1: np.ndarray,
                          thresh_px: float, conf: float = 0.99999, seed: int = 0,
                          image_sizes: tuple | None = None):
    """Relative pose by poselib's LO-RANSAC with non-linear refinement.

    Points are first normalized with ``K`` exactly as :func:`estimate_pose_opencv` does (so any
    ``K``, including the rotated ones of :func:`rotate_intrinsic`, is handled), then poselib runs on
    identity cameras with the epipolar threshold ``thresh_px * (1/f0 + 1/f1) / 2`` (``f`` =
    ``sqrt|det K[:2, :2]|``), which is poselib's own rescaling of a pixel threshold. Its bundle
    adjustment keeps poselib's default loss scale (half the threshold). ``seed`` seeds the RANSAC.
    ``image_sizes`` is accepted for API symmetry and unused.

    Returns ``(R, t (3, 1), inlier mask (N,))`` or ``None`` (fewer than 5 points or inliers).
    """
    import poselib

    if len(kpts0) < 5:
        return None
    p0, p1 = _normalize(np.asarray(kpts0, np.float64), K0), _normalize(np.asarray(kpts1, np.float64), K1)
    f0, f1 = (float(np.sqrt(abs(np.linalg.det(np.asarray(K, np.float64)[:2, :2])))) for K in (K0, K1))
    thresh = float(thresh_px) * 0.5 * (1.0 / f0 + 1.0 / f1)
    ident = {"model": "PINHOLE", "width": 0, "height": 0, "params": [1.0, 1.0, 0.0, 0.0]}
    pose, info = poselib.estimate_relative_pose(
        np.ascontiguousarray(p0), np.ascontiguousarray(p1), ident, ident,
        {"max_epipolar_error": thresh, "success_prob": float(conf), "seed": int(seed)}, {})
    if info.get("num_inliers", 0) < 5:
        return None
    return np.asarray(pose.R), np.asarray(pose.t).reshape(3, 1), np.asarray(info["inliers"], dtype=bool)


def rotate_intrinsic(K: np.ndarray, n: int) -> np.ndarray:
    """The release's treatment of an image rotated by ``n * 90`` degrees (YFCC rotation flags):
    ``K`` left-multiplied by the ``n``-th power of a 90-degree rotation."""
    base = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    return np.linalg.matrix_power(base, n) @ K
