"""MegaDepth training pairs in the public ``prep_scene_info`` format (DKM/LoFTR preprocessing).

``<root>/prep_scene_info/<scene>.npy`` is a pickled dict with ``image_paths``, ``depth_paths``
(h5 files with dataset ``depth``), ``intrinsics`` (N, 3, 3), ``poses`` (N, 4, 4, world-to-camera),
``pairs`` (M, 2) and ``overlaps`` (M,); paths are relative to ``<root>``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from .pairs import make_depth_pair, open_image

log = logging.getLogger(__name__)

#: Held out from training: DKM's own test scenes and LoFTR's MegaDepth-1500 scenes.
TEST_SCENES = ("0017", "0004", "0048", "0013")
MEGADEPTH1500_SCENES = ("0015", "0022")


def read_depth_h5(path) -> torch.Tensor:
    try:
        with h5py.File(path, "r") as f:
            return torch.from_numpy(np.asarray(f["depth"], dtype=np.float32))
    except FileNotFoundError:
        raise FileNotFoundError(f"depth file not found: {path}") from None
    except Exception as e:
        raise OSError(f"corrupt or unreadable depth file {path} (expected h5 with dataset 'depth'): {e}") from e


class MegadepthScene(Dataset):
    """Pairs of one scene with overlap in ``(min_overlap, max_overlap]``, at most ``max_pairs``
    (a seeded random subset, as the recipe caps scenes at 100k pairs)."""

    def __init__(self, data_root, scene_info: dict, name: str, h: int = 384, w: int = 512, min_overlap: float = 0.0,
                 max_overlap: float = 1.0, shake_t: int = 0, rot_prob: float = 0.0, max_pairs: int = 100_000,
                 seed: int = 0):
        self.root, self.name = Path(data_root), name
        self.image_paths, self.depth_paths = scene_info["image_paths"], scene_info["depth_paths"]
        self.intrinsics, self.poses = scene_info["intrinsics"], scene_info["poses"]
        pairs, overlaps = np.asarray(scene_info["pairs"]), np.asarray(scene_info["overlaps"])
        keep = (overlaps > min_overlap) & (overlaps <= max_overlap)
        self.pairs, self.overlaps = pairs[keep], overlaps[keep]
        if len(self.pairs) > max_pairs:
            sel = np.random.default_rng(seed).choice(len(self.pairs), max_pairs, replace=False)
            self.pairs, self.overlaps = self.pairs[sel], self.overlaps[sel]
        self.h, self.w, self.shake_t, self.rot_prob, self.seed = h, w, shake_t, rot_prob, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        a, b = (int(v) for v in self.pairs[i])
        T1, T2 = np.asarray(self.poses[a], np.float64), np.asarray(self.poses[b], np.float64)
        T_1to2 = T2 @ np.linalg.inv(T1)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        out = make_depth_pair(
            open_image(self.root / self.image_paths[a]), open_image(self.root / self.image_paths[b]),
            read_depth_h5(self.root / self.depth_paths[a]), read_depth_h5(self.root / self.depth_paths[b]),
            self.intrinsics[a], self.intrinsics[b], T_1to2, self.h, self.w, self.shake_t, rng, self.rot_prob)
        out["pair_id"] = f"{self.name}/{Path(str(self.image_paths[a])).stem}-{Path(str(self.image_paths[b])).stem}"
        return out


def build_megadepth(data_root, *, overlap_bands=((0.01, 1.0), (0.35, 1.0)), exclude_scenes=TEST_SCENES + MEGADEPTH1500_SCENES,
                    scenes=None, **kw) -> ConcatDataset:
    """All training scenes (``exclude_scenes`` held out), once per overlap band — the recipe
    concatenates a ``> 0.01`` and a ``> 0.35`` copy, so high-overlap pairs are seen more often."""
    root = Path(data_root)
    info_dir = root / "prep_scene_info"
    if not info_dir.is_dir():
        raise FileNotFoundError(f"MegaDepth: missing {info_dir} (see datasets/megadepth/README.md)")
    files = sorted(info_dir.glob("*.npy"))
    if scenes is not None:
        files = [f for f in files if f.stem in set(scenes)]
    files = [f for f in files if f.stem not in set(exclude_scenes)]
    if not files:
        raise FileNotFoundError(f"MegaDepth: no training scene infos (*.npy) in {info_dir}")
    parts = []
    for f in files:
        info = np.load(f, allow_pickle=True).item()
        missing = [k for k in ("image_paths", "depth_paths", "intrinsics", "poses", "pairs", "overlaps") if k not in info]
        if missing:
            raise KeyError(f"{f}: scene info lacks {missing}")
        for lo, hi in overlap_bands:
            parts.append(MegadepthScene(root, info, f.stem, min_overlap=lo, max_overlap=hi, **kw))
    return ConcatDataset([p for p in parts if len(p)])


def scene_weights(dataset: ConcatDataset, alpha: float = 0.75) -> torch.Tensor:
    """Per-pair sampling weights ``1 / n_scene ** alpha`` (n = pairs in that scene part)."""
    return torch.cat([torch.full((len(d),), 1.0 / len(d) ** alpha) for d in dataset.datasets])
