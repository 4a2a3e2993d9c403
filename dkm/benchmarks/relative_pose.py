"""Shared protocol of the relative-pose benchmarks (ScanNet-1500, YFCC100M, MegaDepth-1500)."""
from __future__ import annotations

import numpy as np

from ..geometry.coords import normalized_to_pixel
from ..geometry.metrics import error_auc, mean_accuracy
from ..geometry.pose import estimate_pose_opencv, estimate_pose_poselib, pose_errors
from .base import PairBenchmark


class RelativePoseBenchmark(PairBenchmark):
    """Match, sample, convert to pixels of the rescaled image, estimate the essential matrix,
    score ``max(rotation error, translation error)`` in degrees (90 for a failure).

    Protocol arguments (each benchmark's config sets them; the defaults are the v11 ScanNet ones):
        scale_side / scale_to: image size (and ``K``) rescaled so that its ``"short"`` or ``"long"``
            side is ``scale_to`` before converting matches to pixels (the releases' convention).
        principal_point: ``"calibration"`` (use ``K``'s) or ``"image_center"`` (YFCC/bundler:
            points centred on the image centre, ``K``'s principal point unused).
        threshold_px, threshold_norm: RANSAC threshold in pixels, normalized by
            ``mean(K1[:2, :2]) + mean(K2[:2, :2])`` (``"mean"``, the v11 release: zeros of the 2x2
            block included) or the mean of absolute values (``"mean_abs"``, DKMv3's benchmarks).
        ransac_conf, ransac_repeats, shuffle_repeats: confidence; how many estimates per pair (each
            scored, as DKMv3's MegaDepth/ScanNet benchmarks do with 5), and whether the matches are
            reshuffled before each (OpenCV's RANSAC depends on the order).
        estimator: ``"opencv"`` (as the releases) or ``"poselib"`` (LO-RANSAC, threshold in pixels).
        auc_thresholds: degrees; also the ``map@t`` reported.
    """

    sparse_matching = True

    def __init__(self, data_root, *, num_samples: int = 10000, cycle_consistency: bool = False,
                 center: float = 0.0, scale_side: str = "short", scale_to: float = 480.0,
                 principal_point: str = "calibration", threshold_px: float = 1.0, threshold_norm: str = "mean",
                 ransac_conf: float = 0.9999999, ransac_repeats: int = 1, shuffle_repeats: bool = False,
                 estimator: str = "opencv", failure_error: float = 90.0, auc_thresholds=(5, 10, 20), **kw):
        if scale_side not in ("short", "long"):
            raise ValueError(f"scale_side must be 'short' or 'long', got {scale_side!r}")
        if principal_point not in ("calibration", "image_center"):
            raise ValueError(f"principal_point must be 'calibration' or 'image_center', got {principal_point!r}")
        if threshold_norm not in ("mean", "mean_abs"):
            raise ValueError(f"threshold_norm must be 'mean' or 'mean_abs', got {threshold_norm!r}")
        if estimator not in ("opencv", "poselib"):
            raise ValueError(f"estimator must be 'opencv' or 'poselib', got {estimator!r}")
        self.scale_side, self.scale_to = scale_side, float(scale_to)
        self.principal_point = principal_point
        self.threshold_px, self.threshold_norm = float(threshold_px), threshold_norm
        self.ransac_conf, self.ransac_repeats = float(ransac_conf), int(ransac_repeats)
        self.shuffle_repeats, self.estimator = bool(shuffle_repeats), estimator
        self.failure_error = float(failure_error)
        self.auc_thresholds = list(auc_thresholds)
        super().__init__(data_root, num_samples=num_samples, cycle_consistency=cycle_consistency, center=center, **kw)

    def load_pair(self, pair) -> dict:
        """``im1``, ``im2`` (PIL), ``K1``, ``K2`` (3, 3) for those images, ``R`` (3, 3), ``t`` (3,)."""
        raise NotImplementedError

    def pair_images(self, pair):
        p = self.load_pair(pair)
        return p["im1"], p["im2"]

    def _rescale(self, im, K):
        w, h = im.size
        s = self.scale_to / (min(w, h) if self.scale_side == "short" else max(w, h))
        K = np.array(K, dtype=np.float64).copy()
        K[:2] *= s
        h, w = h * s, w * s
        if self.principal_point == "image_center":
            K[:2, 2] = (w / 2, h / 2)
        return K, (h, w)

    def evaluate_pair(self, model, pair, ctx):
        p = self.load_pair(pair)
        matches, _ = self.sparse_matches(model, p["im1"], p["im2"], ctx)
        K1, hw1 = self._rescale(p["im1"], p["K1"])
        K2, hw2 = self._rescale(p["im2"], p["K2"])
        k1 = normalized_to_pixel(matches[:, :2], hw1[0], hw1[1], self.center)
        k2 = normalized_to_pixel(matches[:, 2:], hw2[0], hw2[1], self.center)
        agg = np.mean if self.threshold_norm == "mean" else (lambda a: np.mean(np.abs(a)))
        norm_thresh = self.threshold_px / (agg(K1[:2, :2]) + agg(K2[:2, :2]))
        e_t, e_R, inliers, reasons = [], [], [], []
        for r in range(self.ransac_repeats):
            if self.shuffle_repeats:
                perm = ctx["rng"].permutation(len(k1))
                k1, k2 = k1[perm], k2[perm]
            try:
                if self.estimator == "opencv":
                    est = estimate_pose_opencv(k1, k2, K1, K2, norm_thresh, self.ransac_conf)
                else:
                    seed = int(np.random.SeedSequence([*ctx["seed"], r]).generate_state(1)[0])  # per pair and run
                    est = estimate_pose_poselib(k1, k2, K1, K2, self.threshold_px, self.ransac_conf,
                                                seed=seed, image_sizes=(hw1, hw2))
                if est is None:
                    raise RuntimeError(f"no pose from {len(k1)} matches")
                et, eR = pose_errors(est[0], est[1], p["R"], p["t"])
                inliers.append(int(np.sum(est[2])))
            except Exception as e:  # scored as the protocol says
                et = eR = self.failure_error
                inliers.append(0)
                reasons.append(f"{type(e).__name__}: {e}")
            e_t.append(et)
            e_R.append(eR)
        e_pose = [max(a, b) for a, b in zip(e_t, e_R)]
        return {"e_t": e_t, "e_R": e_R, "e_pose": e_pose, "inliers": inliers, "num_matches": len(matches),
                "failed": len(reasons) == self.ransac_repeats, "reason": "; ".join(sorted(set(reasons)))}

    def failure_record(self, pair):
        f = [self.failure_error] * self.ransac_repeats
        return {"e_t": f, "e_R": f, "e_pose": f, "inliers": [0] * self.ransac_repeats, "num_matches": 0}

    def compute_metrics(self, records):
        errors = [e for r in records for e in r["e_pose"]]
        out = {f"auc@{t}": 100 * a for t, a in zip(self.auc_thresholds, error_auc(errors, self.auc_thresholds))}
        out |= {f"map@{t}": 100 * mean_accuracy(errors, t) for t in self.auc_thresholds}
        out["num_pairs"] = len(records)
        out["num_failed"] = sum(bool(r["failed"]) for r in records)
        return out
