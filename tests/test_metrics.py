"""Metrics and estimators against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dkm.geometry.homography import estimate_homography, mean_corner_error
from dkm.geometry.metrics import error_auc, mean_accuracy
from dkm.geometry.pose import estimate_pose_opencv, estimate_pose_poselib, pose_errors, relative_pose


def test_auc_hand_computed():
    # sorted errors 1,2,3,4 -> recall 0.25 .. 1; trapezoids worked out by hand
    assert error_auc([4, 2, 1, 3], [2, 4, 10]) == pytest.approx([0.1875, 0.46875, 0.8])
    assert error_auc([0.0] * 7, [1, 5]) == pytest.approx([1.0, 1.0])  # perfect
    assert error_auc([90.0, np.inf, np.nan], [5, 20]) == pytest.approx([0.0, 0.0])  # failures
    # one of two pairs perfect, the other failed: half the area
    assert error_auc([0.0, 90.0], [10]) == pytest.approx([0.5])


def test_mean_accuracy_is_the_release_map():
    e = [1, 7, 12, 18, 30]
    assert mean_accuracy(e, 5) == pytest.approx(0.2)
    assert mean_accuracy(e, 10) == pytest.approx(0.3)
    assert mean_accuracy(e, 20) == pytest.approx(0.5)
    assert mean_accuracy([5.0], 5) == 0.0  # strictly below


def test_pose_errors_and_translation_sign_ambiguity():
    R10 = Rotation.from_euler("z", 10, degrees=True).as_matrix()
    t = np.array([1.0, 0, 0])
    assert pose_errors(R10, t, np.eye(3), t) == pytest.approx((0.0, 10.0))
    assert pose_errors(np.eye(3), -t, np.eye(3), t)[0] == pytest.approx(0.0, abs=1e-6)
    assert pose_errors(np.eye(3), np.array([0, 1.0, 0]), np.eye(3), t)[0] == pytest.approx(90.0)
    R, tr = relative_pose(np.eye(3), np.zeros(3), R10, t)
    np.testing.assert_allclose(R, R10)
    np.testing.assert_allclose(tr, t)
    # world-to-camera poses: camera 1 rotated 90 deg about z and shifted, camera 2 at the identity rotation.
    # x2 = R2 X + t2 = R2 R1^T (x1 - t1) + t2, so R = R1^T = Rz(-90) and t = t2 - Rz(-90) t1 (by hand)
    Rz90 = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    R, tr = relative_pose(Rz90, np.array([1.0, 2.0, 3.0]), np.eye(3), np.array([0.5, 0, 0]))
    np.testing.assert_allclose(R, Rz90.T)
    np.testing.assert_allclose(tr, [0.5 - 2.0, 1.0, -3.0])  # Rz(-90) (1, 2, 3) = (2, -1, 3)


def _two_views(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform([-2, -1.5, 4], [2, 1.5, 8], size=(n, 3))
    K = np.array([[500.0, 0, 320], [0, 510, 240], [0, 0, 1]])
    R = Rotation.from_euler("xyz", [2, -8, 3], degrees=True).as_matrix()
    t = np.array([0.8, 0.1, 0.05])
    def proj(P):
        p = P @ K.T
        return p[:, :2] / p[:, 2:]
    return proj(X), proj(X @ R.T + t), K, R, t


@pytest.mark.parametrize("estimator", ["opencv", "poselib"])
def test_pose_estimators_recover_exact_geometry(estimator):
    k0, k1, K, R, t = _two_views()
    if estimator == "opencv":
        R_est, t_est, inl = estimate_pose_opencv(k0, k1, K, K, norm_thresh=0.5 / 500, conf=0.99999)
    else:
        R_est, t_est, inl = estimate_pose_poselib(k0, k1, K, K, thresh_px=1.0, seed=0, image_sizes=((480, 640),) * 2)
    e_t, e_R = pose_errors(R_est, t_est, R, t)
    assert e_t < 0.1 and e_R < 0.1 and inl.mean() > 0.95
    assert estimate_pose_opencv(k0[:4], k1[:4], K, K, 1e-3) is None


def test_homography_estimation_and_corner_error():
    H = np.array([[1.1, 0.05, 12.0], [-0.02, 0.95, -7.0], [1e-4, 2e-5, 1.0]])
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 400, size=(100, 2))
    q = np.c_[p, np.ones(100)] @ H.T
    q = q[:, :2] / q[:, 2:]
    H_est = estimate_homography(p, q, thresh_px=1.0)
    assert mean_corner_error(H_est, H, 480, 640) < 1e-3
    shift = np.array([[1.0, 0, 3], [0, 1, 4], [0, 0, 1]])
    assert mean_corner_error(shift, np.eye(3), 480, 640) == pytest.approx(5.0)
    # the release's stand-in for a failed estimate maps every corner to (0, 0)
    fail = np.diag([0.0, 0.0, 1.0])
    expected = np.mean([0, 479, 639, np.hypot(639, 479)])
    assert mean_corner_error(fail, np.eye(3), 480, 640) == pytest.approx(expected)


@pytest.mark.parametrize("estimator", ["opencv", "poselib"])
def test_pose_estimators_with_rotated_intrinsics(estimator):
    """YFCC's rotation flags: points in a 90-degree rotated (centred) image frame with K' = R90 K give
    the same pose; poselib works on K-normalized points so the off-diagonal K' is handled."""
    from dkm.geometry.pose import rotate_intrinsic

    k0, k1, K, R, t = _two_views(seed=3)
    Kc = K.copy()
    Kc[:2, 2] = 0  # centred coordinates (bundler)
    k0c, k1c = k0 - K[:2, 2], k1 - K[:2, 2]
    K1r = rotate_intrinsic(Kc, 1)
    k1r = k1c @ np.array([[0, 1], [-1, 0]]).T  # (x, y) -> (y, -x)
    if estimator == "opencv":
        R_est, t_est, _ = estimate_pose_opencv(k0c, k1r, Kc, K1r, norm_thresh=0.5 / 500)
    else:
        R_est, t_est, _ = estimate_pose_poselib(k0c, k1r, Kc, K1r, thresh_px=1.0, seed=1)
    e_t, e_R = pose_errors(R_est, t_est, R, t)
    assert e_t < 0.1 and e_R < 0.1
    np.testing.assert_allclose(K1r[:2, :2], [[0, 510], [-500, 0]])  # the release's mean(K[:2,:2]) ~ 0 quirk
