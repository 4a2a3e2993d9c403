"""Rendered two-view scenes (a textured slanted plane) written in the MegaDepth and ScanNet
training layouts, with exact depth, intrinsics and poses."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

PLANE_N = np.array([0.1, -0.05, 1.0])
PLANE_D = 5.0  # plane: n . X = d (world frame)


def texture_at(X: np.ndarray) -> np.ndarray:
    """Smooth colour texture as a function of the world point (..., 3) -> (..., 3) uint8."""
    x, y = X[..., 0], X[..., 1]
    r = 127 + 100 * np.sin(3.1 * x) * np.cos(2.3 * y)
    g = 127 + 100 * np.sin(1.7 * x + 2.9 * y)
    b = 127 + 100 * np.cos(4.3 * y - 0.7 * x)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def render(K: np.ndarray, w2c: np.ndarray, h: int, w: int):
    """Image and depth of the plane seen by a camera (pixel centres at i + 0.5)."""
    R, t = w2c[:3, :3], w2c[:3, 3]
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays_c = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T  # camera-frame directions, z = 1
    center = -R.T @ t
    rays_w = rays_c @ R  # R^T d
    s = (PLANE_D - PLANE_N @ center) / (rays_w @ PLANE_N)
    X = center + s[..., None] * rays_w
    depth = s.astype(np.float32)  # z of the camera-frame point (rays have z = 1)
    return texture_at(X), depth


def two_cameras(seed: int, h: int, w: int):
    rng = np.random.default_rng(seed)
    K = np.array([[0.9 * w, 0, w / 2 + 2.0], [0, 0.9 * w, h / 2 - 1.5], [0, 0, 1]])
    poses = []
    for k in range(2):
        R = Rotation.from_euler("xyz", rng.uniform(-4, 4, 3) + [0, 6 * k, 0], degrees=True).as_matrix()
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, np.array([-0.4 * k, 0.05 * k, 0.1 * k]) + rng.uniform(-0.05, 0.05, 3)
        poses.append(T)
    return K, poses


def make_megadepth_scene(root: Path, scene: str = "0001", n_pairs: int = 2, hw=(120, 160), seed: int = 0):
    """``root/prep_scene_info/<scene>.npy`` + images and h5 depths under ``Undistorted_SfM/<scene>``."""
    h, w = hw
    img_dir = root / "Undistorted_SfM" / scene / "images"
    dep_dir = root / "phoenix" / "S6" / "zl548" / "MegaDepth_v1" / scene / "dense0" / "depths"
    img_dir.mkdir(parents=True, exist_ok=True)
    dep_dir.mkdir(parents=True, exist_ok=True)
    info = {"image_paths": [], "depth_paths": [], "intrinsics": [], "poses": [], "pairs": [], "overlaps": []}
    for p in range(n_pairs):
        K, poses = two_cameras(seed * 100 + p, h, w)
        for k, T in enumerate(poses):
            im, depth = render(K, T, h, w)
            name = f"{p}_{k}"
            Image.fromarray(im).save(img_dir / f"{name}.jpg", quality=97)
            with h5py.File(dep_dir / f"{name}.h5", "w") as f:
                f["depth"] = depth
            info["image_paths"].append(f"Undistorted_SfM/{scene}/images/{name}.jpg")
            info["depth_paths"].append(str((dep_dir / f"{name}.h5").relative_to(root)))
            info["intrinsics"].append(K)
            info["poses"].append(T)
        info["pairs"].append([2 * p, 2 * p + 1])
        info["overlaps"].append(0.5)
    info = {k: np.array(v, dtype=object if k.endswith("paths") else None) for k, v in info.items()}
    (root / "prep_scene_info").mkdir(parents=True, exist_ok=True)
    np.save(root / "prep_scene_info" / f"{scene}.npy", info, allow_pickle=True)
    return root


def make_scannet_scene(root: Path, scene: int = 0, n_pairs: int = 2, hw=(120, 160), seed: int = 0):
    """``root/scannet_indices/scene<id>.npz`` + ``scans/scans_train/scene<id>_00/{color,depth,pose,intrinsic}``
    (depth png in millimetres, poses camera-to-world; the training code reads K in the i + 0.5 frame)."""
    h, w = hw
    d = root / "scans" / "scans_train" / f"scene{scene:04d}_00"
    for sub in ("color", "depth", "pose", "intrinsic"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    names = []
    for p in range(n_pairs):
        K, poses = two_cameras(seed * 100 + p + 50, h, w)
        frames = (20 * p, 20 * p + 10)
        for f, T in zip(frames, poses):
            im, depth = render(K, T, h, w)
            Image.fromarray(im).save(d / "color" / f"{f}.jpg", quality=97)
            cv2.imwrite(str(d / "depth" / f"{f}.png"), np.round(depth * 1000).astype(np.uint16))
            np.savetxt(d / "pose" / f"{f}.txt", np.linalg.inv(T))
        names.append([scene, 0, *frames])
        K4 = np.eye(4)
        K4[:3, :3] = K
        np.savetxt(d / "intrinsic" / "intrinsic_color.txt", K4)
    (root / "scannet_indices").mkdir(parents=True, exist_ok=True)
    np.savez(root / "scannet_indices" / f"scene{scene:04d}_00.npz", name=np.array(names), score=np.full(len(names), 0.5))
    (root / "meta.json").write_text(json.dumps({"hw": hw}))
    return root
