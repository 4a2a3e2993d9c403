"""MegaDepth training pairs in the public ``prep_scene_info`` format (DKM/LoFTR preprocessing).

``<root>/prep_scene_info/<scene>.npy`` (a pickled dict, as distributed by DKM) or ``<scene>.npz`` with ``image_paths``, ``depth_paths``
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

from ..utils.image import load_image
from ..utils.npz import load_arrays
from .pairs import make_depth_pair

log = logging.getLogger(__name__)

#: DKM's own test scenes.
TEST_SCENES = ("0017", "0004", "0048", "0013")
#: LoFTR's MegaDepth-1500 benchmark scenes.
MEGADEPTH1500_SCENES = ("0015", "0022")
#: The MegaDepth-8-Scenes benchmark scenes (Image Matching Challenge 2021), which DKMv3 trained without.
IMC21_SCENES = ("0008", "0019", "0021", "0024", "0025", "0032", "0063", "1589")
#: Scenes that LoFTR's preprocessing dropped, which DKMv3 trained without too.
LOFTR_IGNORED_SCENES = ("0121", "0133", "0168", "0178", "0229", "0349", "0412", "0430", "0443", "1001", "5014",
                        "5015", "5016")
#: Held out by default (``conf/data/megadepth.yaml``): all of the above.
HELD_OUT_SCENES = TEST_SCENES + MEGADEPTH1500_SCENES + IMC21_SCENES + LOFTR_IGNORED_SCENES


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
                 seed: int = 0, depth_interpolation: str = "bilinear"):
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
        self.depth_interpolation = depth_interpolation
        self.epoch = 0

    def used_files(self) -> list[Path]:
        """Image and depth files referenced by the kept pairs."""
        idx = np.unique(self.pairs.reshape(-1)) if len(self.pairs) else np.zeros(0, int)
        return [self.root / str(p) for i in idx for p in (self.image_paths[i], self.depth_paths[i])]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        a, b = (int(v) for v in self.pairs[i])
        T1, T2 = np.asarray(self.poses[a], np.float64), np.asarray(self.poses[b], np.float64)
        T_1to2 = T2 @ np.linalg.inv(T1)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        out = make_depth_pair(
            load_image(self.root / self.image_paths[a]), load_image(self.root / self.image_paths[b]),
            read_depth_h5(self.root / self.depth_paths[a]), read_depth_h5(self.root / self.depth_paths[b]),
            self.intrinsics[a], self.intrinsics[b], T_1to2, self.h, self.w, self.shake_t, rng, self.rot_prob,
            self.depth_interpolation)
        out["pair_id"] = f"{self.name}/{Path(str(self.image_paths[a])).stem}-{Path(str(self.image_paths[b])).stem}"
        return out


#: what a ``prep_scene_info`` file holds (see the module docstring)
SCENE_INFO_KEYS = ("image_paths", "depth_paths", "intrinsics", "poses", "pairs", "overlaps")


def load_scene_info(path: Path) -> dict:
    """A ``prep_scene_info`` file (``.npy`` pickled dict, ``.npz`` archive or pickled dict) as a dict
    with :data:`SCENE_INFO_KEYS`; errors name the file."""
    try:
        info = load_arrays(path, allow_pickle=True)
    except Exception as e:
        raise OSError(f"MegaDepth: corrupt or unreadable scene info {path}: {e}") from e
    missing = [k for k in SCENE_INFO_KEYS if k not in info]
    if missing:
        raise KeyError(f"{path}: scene info lacks {missing}; expected {list(SCENE_INFO_KEYS)}")
    return info


def check_files(parts, what: str, mode: str = "dirs", max_list: int = 10) -> None:
    """Fail before training if files the pairs need are absent: ``mode="dirs"`` checks every
    directory they live in (fast: catches scenes that were not extracted), ``"all"`` every file,
    ``"none"`` nothing. The error lists the missing paths."""
    if mode == "none":
        return
    if mode not in ("dirs", "all"):
        raise ValueError(f"check_files must be 'dirs', 'all' or 'none', got {mode!r}")
    files = [f for p in parts for f in p.used_files()]
    if mode == "dirs":
        missing = sorted({str(f.parent) for f in files if not f.parent.is_dir()})
    else:
        missing = sorted({str(f) for f in files if not f.is_file()})
    if missing:
        more = f" (+{len(missing) - max_list} more)" if len(missing) > max_list else ""
        raise FileNotFoundError(f"{what}: {len(missing)} missing {'directories' if mode == 'dirs' else 'files'} "
                                f"referenced by the pair lists: " + ", ".join(missing[:max_list]) + more)


def build_megadepth(data_root, *, overlap_bands=((0.01, 1.0), (0.35, 1.0)), exclude_scenes=HELD_OUT_SCENES,
                    scenes=None, check: str = "dirs", **kw) -> ConcatDataset:
    """All training scenes (``exclude_scenes`` held out), once per overlap band — the recipe
    concatenates a ``> 0.01`` and a ``> 0.35`` copy, so high-overlap pairs are seen more often.
    ``check``: see :func:`check_files` (a partial tree fails here, listing what is missing)."""
    root = Path(data_root)
    info_dir = root / "prep_scene_info"
    if not info_dir.is_dir():
        raise FileNotFoundError(f"MegaDepth: missing {info_dir} (see datasets/megadepth/README.md)")
    files = sorted([*info_dir.glob("*.npy"), *info_dir.glob("*.npz")])
    if scenes is not None:
        files = [f for f in files if f.stem in {str(x) for x in scenes}]
    files = [f for f in files if f.stem not in {str(x) for x in exclude_scenes}]
    if not files:
        raise FileNotFoundError(f"MegaDepth: no training scene infos (*.npy / *.npz) in {info_dir}")
    parts = []
    for f in files:
        info = load_scene_info(f)
        for lo, hi in overlap_bands:
            parts.append(MegadepthScene(root, info, f.stem, min_overlap=lo, max_overlap=hi, **kw))
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError(f"MegaDepth: no pairs in {info_dir} within the overlap bands {list(overlap_bands)}")
    check_files(parts, f"MegaDepth ({root})", check)
    return ConcatDataset(parts)


def scene_weights(dataset: ConcatDataset, alpha: float = 0.75) -> torch.Tensor:
    """Per-pair sampling weights ``1 / n_scene ** alpha`` (n = pairs in that scene part)."""
    return torch.cat([torch.full((len(d),), 1.0 / len(d) ** alpha) for d in dataset.datasets])
