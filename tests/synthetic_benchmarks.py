"""Tiny benchmark datasets in the exact on-disk formats of the public releases, with known geometry,
and an "oracle" matcher that returns ground-truth matches for them.

Every image is unique (random texture), so the oracle finds a pair's ground truth by the images'
content hash: it sees only what a real matcher sees.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import cv2
import h5py
import numpy as np
from PIL import Image

from dkm.geometry.coords import pixel_to_normalized


def image_key(im) -> str:
    return hashlib.sha1(np.asarray(Image.open(im) if isinstance(im, (str, Path)) else im).tobytes()).hexdigest()


class OracleMatcher:
    """``match_sparse`` returns registered ground-truth pixel correspondences in normalized
    coordinates under ``center`` (set it to the benchmark's). ``corrupt(pts2, rng)`` may alter them."""

    def __init__(self, center: float):
        self.center = center
        self.table: dict = {}
        self.corrupt = None

    def register(self, im1, im2, pts1, pts2):
        a, b = np.asarray(im1), np.asarray(im2)
        self.table[(image_key(im1), image_key(im2))] = (pts1, pts2, a.shape[:2], b.shape[:2])

    def match_sparse(self, im1, im2):
        pts1, pts2, hw1, hw2 = self.table[(image_key(im1), image_key(im2))]
        if self.corrupt is not None:
            pts1, pts2 = self.corrupt(pts1, pts2)
        m = np.c_[pixel_to_normalized(pts1, *hw1, self.center), pixel_to_normalized(pts2, *hw2, self.center)]
        return m, np.ones(len(m))


def texture(h: int, w: int, seed: int) -> np.ndarray:
    """A random smooth-ish RGB texture (uint8, h x w x 3), distinct per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    return np.clip(big.astype(np.int16) + noise - 20, 0, 255).astype(np.uint8)


def random_homography(rng, h, w, strength=0.08):
    src = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float32)
    dst = src + rng.uniform(-strength, strength, src.shape).astype(np.float32) * np.array([w, h], np.float32)
    return cv2.getPerspectiveTransform(src, dst).astype(np.float64)


def make_hpatches(root: Path, seqs=("i_synth", "v_synth"), hw=(480, 640), seed=0, base_image=None,
                  oracle: OracleMatcher | None = None):
    """``root/hpatches-sequences-release/<seq>/{1..6}.ppm`` and ``H_1_k`` (integer pixel centres)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    for si, seq in enumerate(seqs):
        d = root / "hpatches-sequences-release" / seq
        d.mkdir(parents=True, exist_ok=True)
        im1 = base_image if base_image is not None else texture(h, w, seed * 100 + si)
        Image.fromarray(im1).save(d / "1.ppm")
        grid = np.stack(np.meshgrid(np.arange(8, w - 8, 16.0), np.arange(8, h - 8, 16.0)), -1).reshape(-1, 2)
        for k in range(2, 7):
            H = random_homography(rng, h, w)
            im2 = cv2.warpPerspective(im1, H, (w, h), flags=cv2.INTER_LINEAR)
            Image.fromarray(im2).save(d / f"{k}.ppm")
            np.savetxt(d / f"H_1_{k}", H)
            if oracle is not None:
                q = np.c_[grid, np.ones(len(grid))] @ H.T
                q = q[:, :2] / q[:, 2:]
                keep = (q[:, 0] > 0) & (q[:, 0] < w - 1) & (q[:, 1] > 0) & (q[:, 1] < h - 1)
                # HPatches homographies act on integer-centre pixels: shift into the oracle's frame
                off = oracle.center
                oracle.register(im1, im2, grid[keep] + off, q[keep] + off)
    return root


def _look_at_pair(rng):
    """Two cameras looking at a cloud of points: world-to-camera poses (R, t) and the points."""
    from scipy.spatial.transform import Rotation

    X = rng.uniform([-2, -1.5, 5], [2, 1.5, 9], size=(400, 3))
    R1 = Rotation.from_euler("xyz", rng.uniform(-3, 3, 3), degrees=True).as_matrix()
    t1 = rng.uniform(-0.2, 0.2, 3)
    R2 = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
    t2 = np.array([rng.uniform(0.6, 1.0), rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)])
    return X, (R1, t1), (R2, t2)


def _project(X, R, t, K):
    c = X @ R.T + t
    p = c @ K.T
    return p[:, :2] / p[:, 2:]


def make_scannet(root: Path, n_pairs=3, hw=(480, 640), seed=0, oracle: OracleMatcher | None = None):
    """``root/test.npz`` (``name``, ``rel_pose``) + ``scans_test/sceneXXXX_00/{color,intrinsic}``."""
    rng = np.random.default_rng(seed)
    h, w = hw
    names, rel = [], []
    K = np.array([[577.6, 0, 318.9], [0, 578.7, 242.7], [0, 0, 1]])
    for i in range(n_pairs):
        scene = 707 + i
        d = root / "scans_test" / f"scene{scene:04d}_00"
        (d / "color").mkdir(parents=True, exist_ok=True)
        (d / "intrinsic").mkdir(parents=True, exist_ok=True)
        K4 = np.eye(4)
        K4[:3, :3] = K
        np.savetxt(d / "intrinsic" / "intrinsic_color.txt", K4, fmt="%f")
        X, (R1, t1), (R2, t2) = _look_at_pair(rng)
        f1, f2 = 15 * i, 15 * i + 30
        im1, im2 = texture(h, w, seed * 1000 + 2 * i), texture(h, w, seed * 1000 + 2 * i + 1)
        Image.fromarray(im1).save(d / "color" / f"{f1}.jpg", quality=95)
        Image.fromarray(im2).save(d / "color" / f"{f2}.jpg", quality=95)
        R = R2 @ R1.T
        t = -R @ t1 + t2
        names.append([scene, 0, f1, f2])
        rel.append(np.c_[R, t].reshape(-1))
        if oracle is not None:  # ScanNet K: integer pixel centres
            p1, p2 = _project(X, R1, t1, K), _project(X, R2, t2, K)
            oracle.register(Image.open(d / "color" / f"{f1}.jpg"), Image.open(d / "color" / f"{f2}.jpg"),
                            p1 + oracle.center, p2 + oracle.center)
    np.savez(root / "test.npz", name=np.array(names), rel_pose=np.array(rel))
    return root


def rotate_points(p: np.ndarray, hw, n: int) -> np.ndarray:
    """Pixel points (corner frame) of an ``h x w`` image -> the image ``PIL.rotate(90 n, expand=True)``
    (counter-clockwise) makes of it."""
    h, w = hw
    u, v = p[:, 0], p[:, 1]
    n %= 4
    if n == 0:
        return p
    if n == 1:
        return np.c_[v, w - u]
    if n == 2:
        return np.c_[w - u, h - v]
    return np.c_[h - v, u]


def make_yfcc(root: Path, pairs_per_scene=2, hw=(360, 480), seed=0, scenes=("buckingham_palace", "notre_dame_front_facade",
              "reichstag", "sacre_coeur"), oracle: OracleMatcher | None = None, rotations=None):
    """OANet/SuperGlue YFCC test layout with h5 calibrations (bundler: principal point at the centre).
    ``rotations[j] = (r1, r2)``: the flags written for pair ``j`` of every scene (default 0 0); the
    oracle then matches the rotated images, as the benchmark shows them to a matcher."""
    rng = np.random.default_rng(seed)
    h, w = hw
    meta = []
    (root / "pairs").mkdir(parents=True, exist_ok=True)
    for si, scene in enumerate(scenes):
        d = root / "yfcc100m" / scene / "test"
        (d / "images").mkdir(parents=True, exist_ok=True)
        (d / "calibration").mkdir(parents=True, exist_ok=True)
        images, calibs, pairs = [], [], []
        for j in range(pairs_per_scene):
            X, (R1, t1), (R2, t2) = _look_at_pair(rng)
            f = rng.uniform(400, 600)
            K = np.array([[f, 0, 0], [0, f, 0], [0, 0, 1.0]])  # bundler-style: centred coordinates
            Kc = K.copy()
            Kc[:2, 2] = (w / 2, h / 2)
            ims = []
            for k, (R, t) in enumerate(((R1, t1), (R2, t2))):
                idx = len(images)
                name = f"img_{j}_{k}"
                im = texture(h, w, seed * 10000 + si * 100 + 2 * j + k)
                Image.fromarray(im).save(d / "images" / f"{name}.jpg", quality=95)
                with h5py.File(d / "calibration" / f"calibration_{name}.h5", "w") as fh:
                    fh["K"], fh["R"], fh["T"] = K, R, t.reshape(1, 3)
                    fh["imsize"] = np.array([[w, h]])
                images.append(f"images/{name}.jpg")
                calibs.append(f"calibration/calibration_{name}.h5")
                ims.append(Image.open(d / "images" / f"{name}.jpg"))
            r1, r2 = rotations[j] if rotations is not None else (0, 0)
            pairs.append((len(images) - 2, len(images) - 1))
            meta.append(f"{images[-2]} {images[-1]} {r1} {r2}")
            if oracle is not None:  # centred coordinates + W/2 = the 0.5-centre pixel frame
                oracle.register(ims[0].rotate(90 * r1, expand=True), ims[1].rotate(90 * r2, expand=True),
                                rotate_points(_project(X, R1, t1, Kc), hw, r1),
                                rotate_points(_project(X, R2, t2, Kc), hw, r2))
        (d / "images.txt").write_text("\n".join(images) + "\n")
        (d / "calibration.txt").write_text("\n".join(calibs) + "\n")
        with open(root / "pairs" / f"{scene}-te-1000-pairs.pkl", "wb") as fp:
            pickle.dump(pairs, fp)
    (root / "yfcc_test_pairs_with_gt.txt").write_text("\n".join(meta) + "\n")
    return root


def _object_array(items) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def make_megadepth1500(root: Path, scene_names=("0015_0.1_0.3.npz", "0015_0.3_0.5.npz", "0022_0.1_0.3.npz",
                                                "0022_0.3_0.5.npz", "0022_0.5_0.7.npz"), pairs_per_scene=1,
                       hw=(240, 320), seed=0, oracle: OracleMatcher | None = None):
    """MegaDepth scene-info files + ``Undistorted_SfM/<scene>/images/*.jpg``, as published:
    ``intrinsics``, ``poses`` and ``image_paths`` are object arrays over all images of the scene with
    ``None`` for the unused ones (here slot 0). LoFTR's MegaDepth-1500 files are, despite their
    ``.npz`` name, pickled dicts (also with ``depth_paths``) whose ``pair_infos`` is a list of
    ``(array([i, j]), overlap, central_matches (4,))``; DKM's ``mega_8_scenes_<scene>_<band>.npz``
    are zip archives whose ``pair_infos`` is an (N, 2) object array of ``(array([i, j]), overlap)``."""
    rng = np.random.default_rng(seed)
    h, w = hw
    for si, name in enumerate(scene_names):
        eight_scenes = name.startswith("mega_8_scenes_")
        scene = name.removeprefix("mega_8_scenes_").split("_")[0]
        d = root / "Undistorted_SfM" / scene / "images"
        d.mkdir(parents=True, exist_ok=True)
        paths, Ks, Ts, infos = [None], [None], [None], []
        for j in range(pairs_per_scene):
            X, (R1, t1), (R2, t2) = _look_at_pair(rng)
            K = np.array([[300.0, 0, w / 2 + 3], [0, 300.0, h / 2 - 2], [0, 0, 1]])
            ims = []
            for k, (R, t) in enumerate(((R1, t1), (R2, t2))):
                fn = f"{seed}_{si}_{j}_{k}.jpg"
                Image.fromarray(texture(h, w, seed * 7000 + si * 100 + 2 * j + k)).save(d / fn, quality=95)
                T = np.eye(4)
                T[:3, :3], T[:3, 3] = R, t
                paths.append(f"Undistorted_SfM/{scene}/images/{fn}")
                Ks.append(K)
                Ts.append(T)
                ims.append(Image.open(d / fn))
            ij = (len(paths) - 2, len(paths) - 1)
            infos.append((np.array(ij), 0.2) if eight_scenes else (np.array(ij), 0.3, np.zeros(4)))
            if oracle is not None:  # COLMAP intrinsics: pixel centres at i + 0.5
                oracle.register(ims[0], ims[1], _project(X, R1, t1, K) + (oracle.center - 0.5),
                                _project(X, R2, t2, K) + (oracle.center - 0.5))
        if not eight_scenes:  # LoFTR: a pickle (protocol 4) of a dict, named .npz
            depths = [None] + [p.replace("Undistorted_SfM", "phoenix/S6/zl548/MegaDepth_v1").replace(
                "/images/", "/dense0/depths/").rsplit(".", 1)[0] + ".h5" for p in paths[1:]]
            info = {"image_paths": _object_array(paths), "depth_paths": _object_array(depths),
                    "intrinsics": _object_array(Ks), "poses": _object_array(Ts), "pair_infos": infos}
            with open(root / name, "wb") as f:
                pickle.dump(info, f, protocol=4)
            continue
        pi = np.empty((len(infos), len(infos[0])), dtype=object)
        for r, info in enumerate(infos):
            for c, v in enumerate(info):
                pi[r, c] = v
        np.savez(root / name, pair_infos=pi, intrinsics=_object_array(Ks), poses=_object_array(Ts),
                 image_paths=_object_array(paths))
    return root
