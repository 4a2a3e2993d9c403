"""HPatches: the sequences on disk (shared by both HPatches protocols) and the homography benchmark,
as evaluated by the DKM v11 release."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..geometry.homography import estimate_homography, mean_corner_error
from ..geometry.metrics import error_auc
from ..utils.image import load_image
from .base import PairBenchmark, overridden


class HpatchesSequences(PairBenchmark):
    """The HPatches release on disk: ``<root>/hpatches-sequences-release/<seq>/{1..6}.ppm`` with
    ``H_1_k`` (image 1 pixels -> image k pixels, integer pixel centres). Pairs ``(seq, k)``, k = 2..6,
    of the sequences selected by ``sequences`` (``"all"``, ``"v"`` viewpoint, ``"i"`` illumination)
    minus ``exclude_sequences``, sorted by name. Subclasses implement the protocol."""

    #: sequences of the HPatches release: 57 illumination (i_) and 59 viewpoint (v_) ones
    RELEASE_SEQUENCES = {"i": 57, "v": 59}

    def __init__(self, data_root, *, sequences: str = "all", exclude_sequences=(), **kw):
        if sequences not in ("all", "v", "i"):
            raise ValueError(f"{self.name}: sequences must be 'all', 'v' (viewpoint) or 'i' (illumination), "
                             f"got {sequences!r}")
        self.sequences, self.exclude_sequences = sequences, set(exclude_sequences)
        super().__init__(data_root, **kw)

    @property
    def seqs_path(self) -> Path:
        return self.data_root / "hpatches-sequences-release"

    def required_paths(self):
        return [self.seqs_path]

    def list_pairs(self):
        seqs = sorted(p.name for p in self.seqs_path.iterdir() if p.is_dir())
        if self.sequences in ("v", "i"):
            seqs = [s for s in seqs if s.startswith(self.sequences + "_")]
        seqs = [s for s in seqs if s not in self.exclude_sequences]
        return [(s, k) for s in seqs for k in range(2, 7)]

    def completeness_warnings(self) -> list[str]:
        """A note if fewer sequences are on disk than the release has (e.g. an interrupted extraction):
        the pairs are listed from what is found, so a partial tree would otherwise pass unnoticed."""
        kinds = ("i", "v") if self.sequences == "all" else (self.sequences,)
        found = {k: sum(1 for p in self.seqs_path.iterdir() if p.is_dir() and p.name.startswith(k + "_"))
                 for k in kinds}
        if all(found[k] == self.RELEASE_SEQUENCES[k] for k in kinds):
            return []
        have = ", ".join(f"{found[k]} of {self.RELEASE_SEQUENCES[k]} {k}_" for k in kinds)
        return [f"{self.name}: {have} sequences of the release under {self.seqs_path}: metrics are not "
                "comparable to published ones (re-run datasets/hpatches/download.sh)"]

    def pair_id(self, pair) -> str:
        return f"{pair[0]}/1-{pair[1]}"

    def pair_images(self, pair):
        seq, k = pair
        return load_image(self.seqs_path / seq / "1.ppm"), load_image(self.seqs_path / seq / f"{k}.ppm")

    def _gt(self, pair) -> np.ndarray:
        """The ground-truth homography ``H_1_k`` (3, 3); ``ValueError`` naming the file otherwise."""
        path = self.seqs_path / pair[0] / f"H_1_{pair[1]}"
        try:
            H = np.loadtxt(path)
        except ValueError as e:
            raise ValueError(f"{path}: not a text matrix ({e})") from e
        if H.shape != (3, 3):
            raise ValueError(f"{path}: expected a 3x3 homography, got shape {H.shape}")
        if not np.isfinite(H).all() or np.linalg.cond(H) > 1e12:  # (cond: whatever the matrix's scale)
            raise ValueError(f"{path}: expected a finite, invertible 3x3 homography, got {H.tolist()}")
        return H

    def check_pair(self, pair) -> None:
        super().check_pair(pair)
        self._gt(pair)


class HpatchesHomogBenchmark(HpatchesSequences):
    """Homography estimation on the pairs (1, k) of :class:`HpatchesSequences`.

    Protocol of the release (all values are arguments, set in ``conf/benchmark/hpatches.yaml``):
    cycle-consistent dense matching, 20000 samples, matches converted to pixels with ``center``
    (the release used ``u = W (x + 1) / 2``, i.e. 0.5, although HPatches puts pixel centres on
    integers), OpenCV RANSAC with threshold ``ransac_thr * min(h2, w2) / 480`` and confidence
    0.99999, a failed estimate replaced by ``diag(0, 0, 1)``, the mean error of the four corners
    ``(0, 0), (0, h-1), (w-1, 0), (w-1, h-1)`` divided by ``min(h2, w2) / 480``, AUC at 1..10 px.
    """

    name = "hpatches"
    sparse_matching = True

    def __init__(self, data_root, *, num_samples: int = 20000, cycle_consistency: bool = True,
                 center: float = 0.5, ransac_thr: float = 3.0, ransac_conf: float = 0.99999,
                 normalize_to: float = 480.0, auc_thresholds=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
                 report_at=(3, 5, 10), sequences: str = "all", exclude_sequences=(), **kw):
        self.ransac_thr, self.ransac_conf = ransac_thr, ransac_conf
        self.normalize_to = normalize_to
        self.auc_thresholds, self.report_at = list(auc_thresholds), list(report_at)
        super().__init__(data_root, num_samples=num_samples, cycle_consistency=cycle_consistency,
                         center=center, sequences=sequences, exclude_sequences=exclude_sequences, **kw)

    def evaluate_pair(self, model, pair, ctx):
        im1, im2 = self.pair_images(pair)
        (w1, h1), (w2, h2) = im1.size, im2.size
        H_gt = self._gt(pair)
        matches, _ = self.sparse_matches(model, im1, im2, ctx)
        k1, k2 = self.to_pixels(matches, (h1, w1), (h2, w2))
        scale = min(w2, h2) / self.normalize_to
        H, inliers, reason = None, 0, ""
        try:
            est = estimate_homography(k1, k2, self.ransac_thr * scale, self.ransac_conf, return_inliers=True)
        except Exception as e:  # the release catches any estimator error as "no homography"
            est, reason = None, f"findHomography: {type(e).__name__}: {e}"
        if est is not None:
            H, inl = est
            inliers = int(inl.sum())
        failed = H is None
        if failed:  # the release's stand-in: every corner maps to (0, 0), a large but finite error
            H = np.diag([0.0, 0.0, 1.0])
            reason = reason or f"no homography from {len(matches)} matches"
        err = mean_corner_error(H, H_gt, h1, w1) / scale
        return {"corner_error": err, "inliers": inliers, "num_matches": len(matches), "failed": failed,
                "reason": reason}

    def failure_record(self, pair):
        try:
            seq = self.seqs_path / pair[0]
            w1, h1 = Image.open(seq / "1.ppm").size  # (the header only)
            w2, h2 = Image.open(seq / f"{pair[1]}.ppm").size
            err = mean_corner_error(np.diag([0.0, 0.0, 1.0]), self._gt(pair), h1, w1) / (min(w2, h2) / self.normalize_to)
        except Exception:
            err = float("inf")  # unreadable pair: counted, never recalled
        return {"corner_error": err, "inliers": 0, "num_matches": 0}

    def compute_metrics(self, records):
        errors = [r["corner_error"] for r in records]
        aucs = dict(zip(self.auc_thresholds, error_auc(errors, self.auc_thresholds)))
        out = {f"auc@{t}": 100 * aucs[t] for t in self.report_at}
        out["median_corner_error"] = float(np.median(errors))
        out["num_pairs"] = len(records)
        out["num_failed"] = sum(bool(r["failed"]) for r in records)
        return out

    def benchmark_hpatches(self, model, ransac_thr: float | None = None) -> dict:
        """The original entry point: metrics over all pairs. ``ransac_thr`` (the v11 signature's
        argument, default 3.0) overrides the constructor's threshold for this call."""
        with overridden(self, ransac_thr=self.ransac_thr if ransac_thr is None else float(ransac_thr)):
            return self.benchmark(model)
