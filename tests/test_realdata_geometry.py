"""The training ground truth on real data: Middlebury's calibrated "Motorcycle" stereo pair
(``shared/realdata/stereo_motorcycle``) written in the MegaDepth and ScanNet training layouts, read back
through the training datasets, and compared with the correspondences its disparity map gives directly.

The disparity is an independent form of the same ground truth (left pixel ``(x, y)`` matches right pixel
``(x - d, y)``), so this checks on real calibration, depth and images what the training loss is fed:
the file formats and units, intrinsics, poses (world-to-camera composition), the normalized coordinate
convention and the resizing of images, depths and intrinsics.
"""
from __future__ import annotations

import re

import cv2
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dkm.data.datamodules import collate
from dkm.data.megadepth import build_megadepth
from dkm.data.scannet import build_scannet
from dkm.geometry.coords import normalized_grid, pixel_to_normalized
from dkm.geometry.warp import gt_warp


@pytest.fixture(scope="module")
def stereo(realdata_dir):
    """Images, left disparity (inf = unknown) and calibration of the Middlebury pair."""
    d = realdata_dir / "stereo_motorcycle"
    if not (d / "calib.txt").is_file():
        pytest.skip(f"no Middlebury stereo pair in {d}")
    calib = {}
    for line in (d / "calib.txt").read_text().splitlines():
        key, value = line.split("=", 1)
        nums = [float(v) for v in re.split(r"[\s;\[\]]+", value) if v]
        calib[key] = np.array(nums).reshape(3, 3) if len(nums) == 9 else nums[0]
    with np.load(d / "motorcycle_disp.npz") as z:
        disp = z["arr_0"].astype(np.float64)
    left = np.asarray(Image.open(d / "motorcycle_left.png").convert("RGB"))
    right = np.asarray(Image.open(d / "motorcycle_right.png").convert("RGB"))
    assert left.shape[:2] == right.shape[:2] == disp.shape == (int(calib["height"]), int(calib["width"]))
    return {"left": left, "right": right, "disp": disp, **calib}


def depths_and_pose(st, shared_intrinsics: bool = False):
    """Depth of both views in metres (0 = unknown), intrinsics in the training frame (pixel centres at
    i + 0.5; Middlebury's are at integers) and world-to-camera poses (left camera = world).

    Middlebury's cameras differ in their principal point (by ``doffs``): depth = baseline f / (d + doffs).
    ``shared_intrinsics`` (ScanNet stores one matrix per scene): both cameras get the left one and the
    depth is baseline f / d, the scene that gives the same disparities with identical cameras."""
    f, doffs, baseline = st["cam0"][0, 0], st["doffs"], st["baseline"] / 1000.0
    known = np.isfinite(st["disp"])
    d = np.where(known, st["disp"], 1.0) + (0.0 if shared_intrinsics else doffs)
    depth1 = np.where(known, baseline * f / d, 0.0)
    # the right view's depth: every known left pixel splatted to its right pixel, the nearest surface kept
    h, w = depth1.shape
    depth2 = np.full((h, w), np.inf)
    ys, xs = np.nonzero(known)
    xr = np.rint(xs - st["disp"][ys, xs]).astype(int)
    inside = (xr >= 0) & (xr < w)
    np.minimum.at(depth2, (ys[inside], xr[inside]), depth1[ys[inside], xs[inside]])
    depth2[~np.isfinite(depth2)] = 0.0
    Ks = []
    for cam in ("cam0", "cam0") if shared_intrinsics else ("cam0", "cam1"):
        K = st[cam].copy()
        K[:2, 2] += 0.5
        Ks.append(K)
    T1, T2 = np.eye(4), np.eye(4)
    T2[0, 3] = -baseline  # X_right = X_left - (baseline, 0, 0)
    return depth1.astype(np.float32), depth2.astype(np.float32), Ks, (T1, T2)


def write_megadepth(root, st):
    """The pair as MegaDepth scene 9000: jpg images, h5 depths, a prep_scene_info .npy dict."""
    depth1, depth2, Ks, poses = depths_and_pose(st)
    info = {"image_paths": [], "depth_paths": [], "intrinsics": Ks, "poses": poses, "pairs": [[0, 1]],
            "overlaps": [0.9]}
    for k, (im, depth) in enumerate(((st["left"], depth1), (st["right"], depth2))):
        img = root / "Undistorted_SfM" / "9000" / "images" / f"im{k}.jpg"
        dep = root / "phoenix" / "S6" / "zl548" / "MegaDepth_v1" / "9000" / "dense0" / "depths" / f"im{k}.h5"
        for p in (img, dep):
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(img, quality=98)
        with h5py.File(dep, "w") as fh:
            fh["depth"] = depth
        info["image_paths"].append(str(img.relative_to(root)))
        info["depth_paths"].append(str(dep.relative_to(root)))
    info = {k: np.array(v, dtype=object if k.endswith("paths") else None) for k, v in info.items()}
    (root / "prep_scene_info").mkdir(parents=True)
    np.save(root / "prep_scene_info" / "9000.npy", info, allow_pickle=True)
    return lambda h, w: build_megadepth(root, exclude_scenes=(), h=h, w=w)


def write_scannet(root, st):
    """The pair as ScanNet scene0900_00 frames 0 and 10: jpg colour, 16-bit depth png in mm,
    camera-to-world pose txt, a 4x4 intrinsic_color.txt, a scannet_indices .npz."""
    depth1, depth2, Ks, poses = depths_and_pose(st, shared_intrinsics=True)
    d = root / "scans" / "scans_train" / "scene0900_00"
    for sub in ("color", "depth", "pose", "intrinsic"):
        (d / sub).mkdir(parents=True)
    for frame, im, depth, T in ((0, st["left"], depth1, poses[0]), (10, st["right"], depth2, poses[1])):
        Image.fromarray(im).save(d / "color" / f"{frame}.jpg", quality=98)
        cv2.imwrite(str(d / "depth" / f"{frame}.png"), np.round(depth * 1000).astype(np.uint16))
        np.savetxt(d / "pose" / f"{frame}.txt", np.linalg.inv(T))
    K4 = np.eye(4)
    K4[:3, :3] = Ks[0]
    np.savetxt(d / "intrinsic" / "intrinsic_color.txt", K4)
    (root / "scannet_indices").mkdir(parents=True)
    np.savez(root / "scannet_indices" / "scene0900_00.npz", name=np.array([[900, 0, 0, 10]]), score=np.array([0.9]))
    return lambda h, w: build_scannet(root, h=h, w=w)


LAYOUTS = {"megadepth": write_megadepth, "scannet": write_scannet}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_depth_ground_truth_reproduces_the_disparity(tmp_path, stereo, layout):
    """At the images' own resolution the query grid lies on pixel centres, where depth is exact. The
    depth the dataset reads must give back the disparity (ScanNet's millimetre pngs: within 0.01 px),
    and the ground-truth warp must be ``(x - d, y)`` as the reference computes it: it divides the
    projection by depth + 1e-4 m, which pulls every point towards the pixel origin by ``u 1e-4 / z``
    (up to 0.04 px here), reproduced to 1e-3 px. A wrong pose direction or composition, depth unit or
    coordinate scale ((W - 1) / W) is off by far more. (Half-pixel offsets of the pixel frame cancel in a
    rectified pair with a purely sideways baseline: the rendered scenes of test_training.py check those.)
    Unknown disparity is never valid."""
    h, w = stereo["disp"].shape
    batch = collate([LAYOUTS[layout](tmp_path, stereo)(h, w)[0]])
    warp, valid = gt_warp(batch, h, w)
    warp, valid = warp[0].numpy(), valid[0].numpy()
    known = np.isfinite(stereo["disp"])
    assert not valid[~known].any()
    assert valid.mean() > 0.8 * known.mean(), valid.mean()  # occlusions and splatting holes aside
    # the correspondence that the stored depth z encodes, and the reference's projection of it
    f, baseline = stereo["cam0"][0, 0], stereo["baseline"] / 1000.0
    c1 = np.array([stereo["cam0"][0, 2], stereo["cam0"][1, 2]])  # integer-centre frame, as the disparity
    c2 = c1 if layout == "scannet" else np.array([stereo["cam1"][0, 2], stereo["cam1"][1, 2]])
    z = batch["query_depth"][0].double().numpy()[valid]
    d_stored = f * baseline / z - (c2[0] - c1[0])
    assert np.abs(d_stored - stereo["disp"][valid]).max() < (1e-4 if layout == "megadepth" else 0.01)
    ys, xs = np.nonzero(valid)
    target = np.stack([xs - d_stored, ys], -1) + 0.5  # in the training frame (pixel centres at i + 0.5)
    shrink = (z / (z + 1e-4))[:, None]
    expected = pixel_to_normalized(target * shrink, h, w, center=0.5)
    err_px = np.abs(warp[valid] - expected) * np.array([w / 2, h / 2])
    assert err_px.max() < 1e-3, err_px.max(0)
    quirk_px = np.abs(target * (1 - shrink)).max()
    assert 0.005 < quirk_px < 0.05, quirk_px  # the size of the reference's 1e-4 term on this pair


def photometric_error(batch, shift_px: float) -> float:
    """Mean |query - support pulled through the ground-truth warp shifted by ``shift_px`` columns|."""
    h, w = batch["query"].shape[-2:]
    warp, valid = gt_warp(batch, h, w)
    warp = warp.float() + torch.tensor([2 * shift_px / w, 0.0])
    pulled = F.grid_sample(batch["support"], warp, mode="bilinear", align_corners=False)
    return float((pulled - batch["query"]).abs().mean(1)[valid].mean())


def test_ground_truth_at_the_training_resolution_aligns_the_real_images(tmp_path, stereo):
    """Resized to the recipe's 384x512 (a different aspect ratio: x and y scaled differently), the
    ground truth pulls the real right image onto the left one better than any half-pixel shift of it."""
    batch = collate([write_megadepth(tmp_path, stereo)(384, 512)[0]])
    errors = {s: photometric_error(batch, s) for s in (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)}
    assert min(errors, key=errors.get) == 0.0, errors
    assert errors[0.0] < 0.9 * min(errors[-0.5], errors[0.5]), errors


class DisparityMatcher:
    """A dense matcher whose warp is Middlebury's disparity (left ``(x, y)`` -> right ``(x - d, y)``, pixel
    centres on integers), sampled at the nearest pixel of each query point of its ``h x w`` output grid,
    plus ``shift`` pixels of that grid in x."""

    def __init__(self, disp, h: int, w: int, shift: float = 0.0):
        self.disp, self.h_resized, self.w_resized, self.shift = disp, h, w, shift

    def match(self, im1, im2, check_cycle_consistency=False):
        h, w = self.h_resized, self.w_resized
        H0, W0 = self.disp.shape
        grid = normalized_grid(h, w).double().numpy()
        x = (grid[..., 0] + 1) * W0 / 2 - 0.5  # Middlebury pixels of the query points
        y = (grid[..., 1] + 1) * H0 / 2 - 0.5
        d = self.disp[np.clip(np.rint(y).astype(int), 0, H0 - 1), np.clip(np.rint(x).astype(int), 0, W0 - 1)]
        d = np.where(np.isfinite(d), d, 0.0)  # no disparity: these pixels have no depth ground truth either
        x2 = 2 * (x - d + 0.5) / W0 - 1 + 2 * self.shift / w
        warp = np.stack((x2, grid[..., 1]), axis=-1)
        return torch.cat((torch.from_numpy(grid), torch.from_numpy(warp)), dim=-1).float(), torch.ones(h, w)


@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_dense_benchmark_scores_the_disparity_warp_as_correct(tmp_path, stereo, shift):
    """``MegadepthDenseBenchmark`` on the real pair written as a MegaDepth scene: the warp the disparity
    gives (an independent form of the ground truth) is within a pixel of the depth warp almost
    everywhere at 384x512 (another aspect ratio than the images'), and a 2 px shift moves it out of PCK@1."""
    from dkm.benchmarks import MegadepthDenseBenchmark

    write_megadepth(tmp_path, stereo)
    bench = MegadepthDenseBenchmark(tmp_path, scenes=["9000"])
    metrics = bench.benchmark(DisparityMatcher(stereo["disp"], 384, 512, shift))
    assert bench.last_records[0]["num_gt"] > 0.5 * 384 * 512  # measured: 145851 of 196608
    if shift == 0:  # measured: PCK@1 99.4, EPE 0.080 px
        assert metrics["pck@1"] > 98.5 and metrics["epe"] < 0.15, metrics
    else:  # measured: PCK@1 0.02, PCK@3 99.4, EPE 2.065 px
        assert metrics["pck@1"] < 1 and metrics["pck@3"] > 98.5 and abs(metrics["epe"] - 2) < 0.15, metrics
