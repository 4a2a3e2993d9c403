"""ScanNet-1500 (SuperGlue split, LoFTR's release of it)."""
from __future__ import annotations

import numpy as np

from ..utils.image import load_image
from ..utils.npz import load_arrays
from .relative_pose import RelativePoseBenchmark


def read_intrinsic_txt(path) -> np.ndarray:
    """ScanNet ``intrinsic_color.txt`` (a 4x4 matrix, rows of whitespace-separated numbers) -> (3, 3)."""
    rows = [[float(v) for v in line.split()] for line in open(path).read().splitlines() if line.strip()]
    K = np.array(rows, dtype=np.float64)
    if K.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"{path}: expected a 4x4 or 3x3 matrix, got shape {K.shape}")
    return K[:3, :3]


class ScanNetBenchmark(RelativePoseBenchmark):
    """``<root>/test.npz`` (``name`` rows ``[scene, sub-scene, frame1, frame2]``, ``rel_pose`` (N, 12)
    = the 3x4 pose 1 -> 2) and ``<root>/scans_test/sceneXXXX_YY/{color/<frame>.jpg,
    intrinsic/intrinsic_color.txt}``. Defaults: the v11 release (``conf/benchmark/scannet.yaml``)."""

    name = "scannet"

    def __init__(self, data_root="data/scannet", **kw):
        super().__init__(data_root, **kw)  # RelativePoseBenchmark's defaults are the v11 ScanNet protocol

    def required_paths(self):
        return [self.data_root / "test.npz", self.data_root / "scans_test"]

    def list_pairs(self):
        path = self.data_root / "test.npz"
        z = load_arrays(path)
        if "name" not in z or "rel_pose" not in z:
            raise KeyError(f"{path}: expected arrays 'name' (N, 4) and 'rel_pose' (N, 12), found {sorted(z)}")
        names, poses = np.asarray(z["name"]), np.asarray(z["rel_pose"])
        if names.ndim != 2 or names.shape[1] != 4 or poses.ndim != 2 or poses.shape[1] != 12:
            raise ValueError(f"{path}: expected 'name' (N, 4) (scene, sub-scene, frame, frame) and 'rel_pose' "
                             f"(N, 12) (a 3x4 pose per row), got {names.shape} and {poses.shape}")
        if len(names) != len(poses):
            raise ValueError(f"{path}: {len(names)} names but {len(poses)} rel_pose rows")
        return [(tuple(int(v) for v in n), np.asarray(p, dtype=np.float64).reshape(3, 4)) for n, p in zip(names, poses)]

    def pair_id(self, pair) -> str:
        (scene, sub, f1, f2), _ = pair
        return f"scene{scene:04d}_{sub:02d}/{f1}-{f2}"

    def load_pair(self, pair):
        (scene, sub, f1, f2), T = pair
        d = self.data_root / "scans_test" / f"scene{scene:04d}_{sub:02d}"
        K = read_intrinsic_txt(d / "intrinsic" / "intrinsic_color.txt")
        return {"im1": load_image(d / "color" / f"{f1}.jpg"), "im2": load_image(d / "color" / f"{f2}.jpg"),
                "K1": K, "K2": K, "R": T[:, :3], "t": T[:, 3]}

    def benchmark_scannet(self, model) -> dict:
        """The original entry point."""
        return self.benchmark(model)
