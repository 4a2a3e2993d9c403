"""MegaDepth-1500 (LoFTR's test split; the later DKM protocol)."""
from __future__ import annotations

import numpy as np

from ..geometry.pose import relative_pose
from ..utils.image import load_image
from ..utils.npz import load_arrays
from .relative_pose import RelativePoseBenchmark

SCENE_INFOS = ("0015_0.1_0.3.npz", "0015_0.3_0.5.npz", "0022_0.1_0.3.npz", "0022_0.3_0.5.npz", "0022_0.5_0.7.npz")
#: MegaDepth-8-Scenes: the DKM release's ``assets/mega_8_scenes_<scene>_<overlap band>.npz``, in its order
EIGHT_SCENES = tuple(f"mega_8_scenes_{scene}_{band}.npz" for band in ("0.1_0.3", "0.3_0.5")
                     for scene in ("0019", "0025", "0021", "0008", "0032", "1589", "0063", "0024"))


class Megadepth1500Benchmark(RelativePoseBenchmark):
    """``<root>/<scene_info>.npz`` (LoFTR format: ``pair_infos`` entries ``((i, j), overlap, ...)``,
    ``intrinsics`` (N, 3, 3), ``poses`` (N, 4, 4) world-to-camera, ``image_paths`` relative to the
    root, e.g. ``Undistorted_SfM/0015/images/<name>.jpg``)."""

    name = "megadepth1500"

    #: the later DKM release's MegaDepth-1500 protocol (= conf/benchmark/megadepth1500.yaml)
    PROTOCOL = {"num_samples": 5000, "center": 0.5, "scale_side": "long", "scale_to": 1200.0,
                "threshold_px": 0.5, "threshold_norm": "mean_abs", "ransac_conf": 0.99999, "ransac_repeats": 5,
                "shuffle_repeats": True}

    def __init__(self, data_root="data/megadepth", *, scene_names=SCENE_INFOS, **kw):
        self.scene_names = list(SCENE_INFOS if scene_names is None else scene_names)  # None: as DKMv3's default
        super().__init__(data_root, **(self.PROTOCOL | kw))

    def required_paths(self):
        return [self.data_root / s for s in self.scene_names]

    def list_pairs(self):
        pairs = []
        for name in self.scene_names:
            path = self.data_root / name
            z = load_arrays(path, allow_pickle=True)  # LoFTR's files are pickled dicts, DKM's .npz archives
            try:
                infos, K, T, paths = z["pair_infos"], z["intrinsics"], z["poses"], z["image_paths"]
            except KeyError as e:
                raise KeyError(f"{path}: expected pair_infos, intrinsics, poses and image_paths; no {e}") from None
            n = min(len(K), len(T), len(paths))
            for k, info in enumerate(infos):
                i, j = (int(v) for v in info[0])
                if not (0 <= i < n and 0 <= j < n):
                    raise ValueError(f"{path}: pair_infos[{k}] refers to images ({i}, {j}), but the scene has "
                                     f"{len(paths)} image_paths, {len(K)} intrinsics and {len(T)} poses")
                pairs.append({"scene": name.removesuffix(".npz"), "im1": str(paths[i]), "im2": str(paths[j]),
                              "K1": np.asarray(K[i], np.float64), "K2": np.asarray(K[j], np.float64),
                              "T1": np.asarray(T[i], np.float64), "T2": np.asarray(T[j], np.float64)})
        return pairs

    def pair_id(self, pair) -> str:
        return f"{pair['scene']}/{pair['im1'].rsplit('/', 1)[-1]}-{pair['im2'].rsplit('/', 1)[-1]}"

    def load_pair(self, pair):
        R, t = relative_pose(pair["T1"][:3, :3], pair["T1"][:3, 3], pair["T2"][:3, :3], pair["T2"][:3, 3])
        return {"im1": load_image(self.data_root / pair["im1"]), "im2": load_image(self.data_root / pair["im2"]),
                "K1": pair["K1"], "K2": pair["K2"], "R": R, "t": t}


class Megadepth8ScenesBenchmark(Megadepth1500Benchmark):
    """MegaDepth-8-Scenes (DKM's split): the MegaDepth-1500 protocol on the release's 16 pair files
    (same scene-info format, images from ``Undistorted_SfM/``)."""

    name = "megadepth_8_scenes"

    #: the release evaluates these pairs only with DKMv3 outdoor's test settings (= conf/benchmark/megadepth_8_scenes.yaml)
    PROTOCOL = Megadepth1500Benchmark.PROTOCOL | {"resolution": (660, 880), "upsample_preds": True,
                                                   "upsample_res": (1152, 1536)}

    def __init__(self, data_root="data/megadepth", *, scene_names=EIGHT_SCENES, **kw):
        super().__init__(data_root, scene_names=EIGHT_SCENES if scene_names is None else scene_names, **kw)
