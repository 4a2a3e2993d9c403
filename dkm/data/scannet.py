"""ScanNet training pairs (``scannet_indices/*.npz`` with ``name`` rows ``[scene, sub, frame1, frame2]``
and ``score``; ``scans/scans_train/sceneXXXX_YY/{color/*.jpg, depth/*.png (mm), pose/*.txt
(camera-to-world), intrinsic/intrinsic_color.txt}``)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from ..utils.image import load_image
from ..utils.npz import load_arrays
from .megadepth import check_files
from .pairs import make_depth_pair


def read_depth_png(path) -> torch.Tensor:
    d = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if d is None:
        raise OSError(f"missing or corrupt depth image {path} (expected 16-bit png in millimetres)")
    return torch.from_numpy(d.astype(np.float32) / 1000.0)


def read_matrix(path, shape) -> np.ndarray:
    try:
        m = np.loadtxt(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None
    except Exception as e:
        raise OSError(f"corrupt matrix file {path}: {e}") from e
    if m.shape != shape:
        raise ValueError(f"{path}: expected a {shape} matrix, got {m.shape}")
    return m


class ScanNetScene(Dataset):
    """Pairs of one index file; as the recipe, only frames that are multiples of 10, at most
    ``max_pairs`` of them (seeded subset). ``min_score``: also keep only pairs whose overlap score
    exceeds it (None, the recipe: no such filter)."""

    def __init__(self, data_root, index: dict, name: str, h: int = 384, w: int = 512, shake_t: int = 0,
                 max_pairs: int = 10_000, seed: int = 0, min_score: float | None = None,
                 depth_interpolation: str = "bilinear"):
        self.scene_root = Path(data_root) / "scans" / "scans_train"
        names, scores = np.asarray(index["name"]), np.asarray(index["score"])
        keep = (names[:, -2:] % 10).sum(-1) == 0
        if min_score is not None:
            keep &= scores > min_score
        names, scores = names[keep], scores[keep]
        if len(names) > max_pairs:
            sel = np.random.default_rng(seed).choice(len(names), max_pairs, replace=False)
            names, scores = names[sel], scores[sel]
        self.names, self.scores, self.name = names, scores, name
        self.h, self.w, self.shake_t, self.seed, self.epoch = h, w, shake_t, seed, 0
        self.depth_interpolation = depth_interpolation

    def _dir(self, scene: int, sub: int) -> Path:
        return self.scene_root / f"scene{int(scene):04d}_{int(sub):02d}"

    def used_files(self) -> list[Path]:
        """Colour, depth and pose files referenced by the kept pairs, and each scene's intrinsics."""
        out, scenes = [], set()
        for scene, sub, f1, f2 in self.names.tolist():
            d = self._dir(scene, sub)
            scenes.add(d)
            out += [d / "color" / f"{f}.jpg" for f in (f1, f2)] + [d / "depth" / f"{f}.png" for f in (f1, f2)]
            out += [d / "pose" / f"{f}.txt" for f in (f1, f2)]
        return out + [d / "intrinsic" / "intrinsic_color.txt" for d in sorted(scenes)]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        scene, sub, f1, f2 = (int(v) for v in self.names[i])
        d = self._dir(scene, sub)
        K = read_matrix(d / "intrinsic" / "intrinsic_color.txt", (4, 4))[:3, :3]
        w2c1 = np.linalg.inv(read_matrix(d / "pose" / f"{f1}.txt", (4, 4)))
        w2c2 = np.linalg.inv(read_matrix(d / "pose" / f"{f2}.txt", (4, 4)))
        rng = np.random.default_rng([self.seed, self.epoch, i])
        out = make_depth_pair(load_image(d / "color" / f"{f1}.jpg"), load_image(d / "color" / f"{f2}.jpg"),
                              read_depth_png(d / "depth" / f"{f1}.png"), read_depth_png(d / "depth" / f"{f2}.png"),
                              K, K, w2c2 @ np.linalg.inv(w2c1), self.h, self.w, self.shake_t, rng,
                              depth_interpolation=self.depth_interpolation)
        out["pair_id"] = f"scene{scene:04d}_{sub:02d}/{f1}-{f2}"
        return out


def build_scannet(data_root, check: str = "dirs", **kw) -> ConcatDataset:
    """All index files of ``<data_root>/scannet_indices`` (one part per file, as the recipe's scene
    weighting). ``check``: see :func:`~dkm.data.megadepth.check_files`."""
    idx_dir = Path(data_root) / "scannet_indices"
    scans = Path(data_root) / "scans" / "scans_train"
    missing = [str(p) for p in (idx_dir, scans) if not p.is_dir()]
    if missing:
        raise FileNotFoundError("ScanNet: missing " + ", ".join(missing) + " (see datasets/scannet/README.md)")
    files = sorted(idx_dir.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"ScanNet: no index files (*.npz) in {idx_dir}")
    parts = []
    for f in files:
        try:
            z = load_arrays(f)
            index = {"name": z["name"], "score": z["score"]}
        except KeyError as e:
            raise KeyError(f"ScanNet index {f}: expected arrays 'name' (N, 4) and 'score' (N,): {e}") from None
        except Exception as e:
            raise OSError(f"ScanNet: corrupt or unreadable index file {f}: {e}") from e
        parts.append(ScanNetScene(data_root, index, f.stem, **kw))
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError(f"ScanNet: no pairs (frames multiple of 10) in {idx_dir}")
    check_files(parts, f"ScanNet ({data_root})", check)
    return ConcatDataset(parts)
