"""YFCC100M, the OANet/SuperGlue test split (4 scenes x 1000 pairs)."""
from __future__ import annotations

import pickle

import h5py
import numpy as np

from ..geometry.pose import relative_pose, rotate_intrinsic
from ..utils.image import load_image
from .relative_pose import RelativePoseBenchmark

SCENES = ("buckingham_palace", "notre_dame_front_facade", "reichstag", "sacre_coeur")


def read_calibration_h5(path):
    """OANet calibration file -> ``K`` (3, 3), ``R`` (3, 3), ``t`` (3,) world-to-camera, ``(h, w)``."""
    with h5py.File(path, "r") as f:
        for key in ("K", "R", "T", "imsize"):
            if key not in f:
                raise KeyError(f"{path}: missing dataset {key!r} (expected K, R, T, imsize)")
        K, R = np.array(f["K"], dtype=np.float64), np.array(f["R"], dtype=np.float64)
        t = np.array(f["T"], dtype=np.float64).reshape(3)
        w, h = np.array(f["imsize"]).reshape(-1)[:2]
    return K, R, t, (int(h), int(w))


class Yfcc100mBenchmark(RelativePoseBenchmark):
    """``<root>/yfcc_test_pairs_with_gt.txt`` (rotation flags in columns 3-4),
    ``<root>/pairs/<scene>-te-1000-pairs.pkl`` (image index pairs) and
    ``<root>/yfcc100m/<scene>/test/{images.txt, calibration.txt, <the files they list>}``.
    Images are rotated by their flags (PIL, counter-clockwise, expand) and ``K`` with
    :func:`~dkm.geometry.pose.rotate_intrinsic`, as the release does."""

    name = "yfcc"

    #: the v11 release's YFCC protocol (= conf/benchmark/yfcc.yaml), where it differs from ScanNet's
    PROTOCOL = {"num_samples": 20000, "center": 0.5, "principal_point": "image_center"}

    def __init__(self, data_root="data/yfcc100m_test", *, scenes=SCENES, **kw):
        self.scenes = list(scenes)
        super().__init__(data_root, **(self.PROTOCOL | kw))

    def scene_dir(self, scene):
        return self.data_root / "yfcc100m" / scene / "test"

    def required_paths(self):
        paths = [self.data_root / "yfcc_test_pairs_with_gt.txt"]
        for s in self.scenes:
            paths += [self.data_root / "pairs" / f"{s}-te-1000-pairs.pkl", self.scene_dir(s) / "images.txt",
                      self.scene_dir(s) / "calibration.txt"]
        return paths

    def list_pairs(self):
        gt = self.data_root / "yfcc_test_pairs_with_gt.txt"
        meta = [line.split() for line in open(gt).read().splitlines() if line.strip()]
        short = [k for k, row in enumerate(meta) if len(row) < 4]
        if short:
            raise ValueError(f"{gt}: line {short[0] + 1} has {len(meta[short[0]])} columns; expected the OANet "
                             "format (image 1, image 2, rotation 1, rotation 2, intrinsics, pose)")
        pairs, offset = [], 0
        for scene in self.scenes:
            pkl = self.data_root / "pairs" / f"{scene}-te-1000-pairs.pkl"
            try:
                with open(pkl, "rb") as f:
                    scene_pairs = np.asarray(pickle.load(f))
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
                raise ValueError(f"{pkl}: could not be read as a pickled list of image index pairs ({e})") from e
            if scene_pairs.ndim != 2 or scene_pairs.shape[1] != 2:
                raise ValueError(f"{pkl}: expected (N, 2) image index pairs, got shape {scene_pairs.shape}")
            # indexed exactly as the release reads them: the file split on "\n"
            images = open(self.scene_dir(scene) / "images.txt").read().split("\n")
            calibs = open(self.scene_dir(scene) / "calibration.txt").read().split("\n")
            listed = min(len(images), len(calibs))
            bad = [int(i) for i in np.unique(scene_pairs) if not (0 <= i < listed and images[i] and calibs[i])]
            if bad:
                raise ValueError(f"{pkl}: image index {bad[0]} has no line in {self.scene_dir(scene)}'s images.txt "
                                 f"({len(images)} lines) or calibration.txt ({len(calibs)} lines)")
            if offset + len(scene_pairs) > len(meta):
                raise ValueError(f"{self.data_root / 'yfcc_test_pairs_with_gt.txt'}: {len(meta)} lines, but the "
                                 f"pair lists up to {scene} need {offset + len(scene_pairs)}")
            for j, (i1, i2) in enumerate(scene_pairs):
                # The release reads line 1000 * scene_index + j (scenes follow each other in the file,
                # 1000 pairs each); the running offset is the same on the real split.
                row = meta[offset + j]
                pairs.append({"scene": scene, "im1": images[i1], "im2": images[i2], "calib1": calibs[i1],
                              "calib2": calibs[i2], "rot1": int(row[2]), "rot2": int(row[3])})
            offset += len(scene_pairs)
        return pairs

    def pair_id(self, pair) -> str:
        return f"{pair['scene']}/{pair['im1'].rsplit('/', 1)[-1]}-{pair['im2'].rsplit('/', 1)[-1]}"

    def load_pair(self, pair):
        d = self.scene_dir(pair["scene"])
        K1, R1, t1, _ = read_calibration_h5(d / pair["calib1"])
        K2, R2, t2, _ = read_calibration_h5(d / pair["calib2"])
        R, t = relative_pose(R1, t1, R2, t2)
        im1 = load_image(d / pair["im1"]).rotate(pair["rot1"] * 90, expand=True)
        im2 = load_image(d / pair["im2"]).rotate(pair["rot2"] * 90, expand=True)
        return {"im1": im1, "im2": im2, "K1": rotate_intrinsic(K1, pair["rot1"]),
                "K2": rotate_intrinsic(K2, pair["rot2"]), "R": R, "t": t}

    def benchmark_yfcc100m(self, model) -> dict:
        """The original entry point."""
        return self.benchmark(model)
