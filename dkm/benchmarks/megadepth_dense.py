"""Dense MegaDepth benchmark: the end-point error and PCK of the predicted warp against the warp
given by MegaDepth's depth maps and poses, as DKMv3's training scripts validate with
(``MegadepthDenseBenchmark`` of the DKM release, logged as ``mega_pck_1/3/5``).

Pairs come from the training layout (``<root>/prep_scene_info/<scene>.npy`` or ``.npz``, see
:mod:`dkm.data.megadepth`), by default the MegaDepth-1500 scenes ``0015`` and ``0022`` (the release's
``test_loftr`` split), which the training configs hold out.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.megadepth import load_scene_info, read_depth_h5
from ..data.pairs import resize_depth, scale_intrinsics
from ..geometry.coords import normalized_to_pixel
from ..geometry.warp import warp_kpts
from ..utils.image import load_image
from .base import PairBenchmark
from .dense import DenseWarpScoring


class MegadepthDenseBenchmark(DenseWarpScoring, PairBenchmark):
    """Dense warp accuracy on MegaDepth pairs with depth ground truth.

    Protocol (values in ``conf/benchmark/megadepth_dense.yaml``): ``num_pairs`` pairs drawn uniformly
    without replacement from the pairs with overlap ``> min_overlap`` of ``scenes`` (the release drew
    4000 with ``WeightedRandomSampler`` on every call; here the draw is seeded by ``seed``, so every
    validation scores the same pairs). Each pair is matched with ``model.match(im1, im2)`` at the
    model's resolution (``resolution`` to set one); the ground truth is the depth warp of the
    returned query points (:func:`~dkm.geometry.warp.warp_kpts` on the depths resized to the output
    grid, bilinearly as in training). Errors are distances in pixels of the output grid; a pair's
    EPE and PCK@t are over its pixels with ground truth, scored as :mod:`dkm.benchmarks.dense` says
    (means over the pairs; the release averaged batches of 8 pairs pooled pixel-wise).
    """

    name = "megadepth_dense"

    def __init__(self, data_root="data/megadepth", *, scenes=("0015", "0022"), num_pairs: int | None = 4000,
                 min_overlap: float = 0.0, pck_thresholds=(1, 3, 5), depth_interpolation: str = "bilinear", **kw):
        self.scenes = [str(s) for s in scenes]
        if num_pairs is not None and (isinstance(num_pairs, bool) or int(num_pairs) != num_pairs or num_pairs < 1):
            raise ValueError(f"{self.name}: num_pairs={num_pairs!r}; expected a positive count or None (all pairs)")
        self.num_pairs = None if num_pairs is None else int(num_pairs)
        self.min_overlap = float(min_overlap)
        self.pck_thresholds = [float(t) for t in pck_thresholds]
        self.depth_interpolation = depth_interpolation
        self._infos: dict[str, dict] = {}
        kw.setdefault("num_samples", 0)  # dense: nothing is sampled
        super().__init__(data_root, **kw)

    # ------------------------------------------------------------------ dataset
    @property
    def info_dir(self) -> Path:
        return self.data_root / "prep_scene_info"

    def _info_path(self, scene: str) -> Path:
        for ext in (".npy", ".npz"):
            if (self.info_dir / f"{scene}{ext}").is_file():
                return self.info_dir / f"{scene}{ext}"
        return self.info_dir / f"{scene}.npy"

    def required_paths(self):
        return [self._info_path(s) for s in self.scenes]

    def _info(self, scene: str) -> dict:
        if scene not in self._infos:
            self._infos[scene] = load_scene_info(self._info_path(scene))
        return self._infos[scene]

    def list_pairs(self):
        pairs = []
        for scene in self.scenes:
            info = self._info(scene)
            ij, overlaps = np.asarray(info["pairs"]).reshape(-1, 2), np.asarray(info["overlaps"]).reshape(-1)
            if len(ij) != len(overlaps):
                raise ValueError(f"{self._info_path(scene)}: {len(ij)} pairs but {len(overlaps)} overlaps")
            n = len(info["image_paths"])
            if len(ij) and (ij.min() < 0 or ij.max() >= n):
                raise ValueError(f"{self._info_path(scene)}: pair indices outside [0, {n}) images")
            pairs += [(scene, int(i), int(j)) for (i, j), o in zip(ij, overlaps) if o > self.min_overlap]
        if self.num_pairs is not None and self.num_pairs < len(pairs):
            pick = np.random.default_rng(self.seed).choice(len(pairs), self.num_pairs, replace=False)
            pairs = [pairs[k] for k in sorted(pick)]
        return pairs

    def pair_id(self, pair) -> str:
        scene, i, j = pair
        paths = self._info(scene)["image_paths"]
        return f"{scene}/{Path(str(paths[i])).stem}-{Path(str(paths[j])).stem}"

    def pair_images(self, pair):
        scene, i, j = pair
        paths = self._info(scene)["image_paths"]
        return load_image(self.data_root / str(paths[i])), load_image(self.data_root / str(paths[j]))

    def check_pair(self, pair) -> None:
        self.pair_images(pair)
        self._ground_truth(pair)

    def _ground_truth(self, pair):
        """Depths, intrinsics and relative pose of ``pair`` (full resolution, intrinsics of the images)."""
        scene, i, j = pair
        info = self._info(scene)
        d1 = read_depth_h5(self.data_root / str(info["depth_paths"][i]))
        d2 = read_depth_h5(self.data_root / str(info["depth_paths"][j]))
        T1, T2 = (np.asarray(info["poses"][k], np.float64) for k in (i, j))
        return d1, d2, np.asarray(info["intrinsics"][i]), np.asarray(info["intrinsics"][j]), T2 @ np.linalg.inv(T1)

    # ------------------------------------------------------------------ protocol
    def evaluate_pair(self, model, pair, ctx):
        im1, im2 = self.pair_images(pair)
        d1, d2, K1, K2, T_1to2 = self._ground_truth(pair)
        dense = self.dense_warp(model, im1, im2)
        h, w = dense.shape[:2]
        dense = dense.reshape(1, h * w, 4)
        K1 = scale_intrinsics(K1, w / im1.width, h / im1.height).double()
        K2 = scale_intrinsics(K2, w / im2.width, h / im2.height).double()
        valid, gt = warp_kpts(dense[..., :2], resize_depth(d1, h, w, self.depth_interpolation)[None].double(),
                              resize_depth(d2, h, w, self.depth_interpolation)[None].double(),
                              torch.from_numpy(T_1to2)[None], K1[None], K2[None])
        # pixel distances on the h x w output grid (the centre offset cancels in a difference)
        err = (normalized_to_pixel(dense[0, :, 2:], h, w) - normalized_to_pixel(gt[0], h, w)).norm(dim=-1)[valid[0]]
        return self.error_record(err)
