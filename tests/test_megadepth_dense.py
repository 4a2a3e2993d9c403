"""The dense MegaDepth benchmark (EPE / PCK of a dense warp against the depth warp).

Ground truth for the oracles comes from the training data path (``make_depth_pair`` + ``gt_warp``),
the benchmark computes its own from the files (intrinsics scaled, depths resized to the output grid):
an oracle scores PCK 100 and EPE 0, a warp shifted by a known number of pixels scores what the shift
gives. The real-data check against Middlebury's disparity is in ``test_realdata_geometry.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dkm.benchmarks import BENCHMARKS, MegadepthDenseBenchmark
from dkm.data.megadepth import read_depth_h5
from dkm.data.pairs import make_depth_pair
from dkm.evaluation import build_benchmark
from dkm.geometry.coords import normalized_grid
from dkm.geometry.warp import gt_warp
from synthetic_benchmarks import image_key
from synthetic_scenes import make_megadepth_scene
from test_benchmarks import REPO, protocol


class DenseOracle:
    """``match`` returns the ground-truth warp of registered pairs at ``h_resized x w_resized``, its
    support points moved by ``shift`` pixels of that grid (x, y)."""

    def __init__(self, bench: MegadepthDenseBenchmark, h: int, w: int, shift=(0.0, 0.0), symmetric=False):
        self.h_resized, self.w_resized, self.shift, self.symmetric = h, w, shift, symmetric
        self.table = {}
        for pair in bench.pairs():
            scene, i, j = pair
            info = bench._info(scene)
            im1, im2 = bench.pair_images(pair)
            T = np.asarray(info["poses"][j]) @ np.linalg.inv(np.asarray(info["poses"][i]))
            d = make_depth_pair(im1, im2, *(read_depth_h5(bench.data_root / info["depth_paths"][k]) for k in (i, j)),
                                info["intrinsics"][i], info["intrinsics"][j], T, h, w)
            warp, _ = gt_warp({k: v[None] for k, v in d.items()}, h, w)
            self.table[(image_key(im1), image_key(im2))] = warp[0].float()

    def match(self, im1, im2, check_cycle_consistency=False):
        warp = self.table[(image_key(im1), image_key(im2))].clone()
        h, w = self.h_resized, self.w_resized
        warp[..., 0] += 2 * self.shift[0] / w
        warp[..., 1] += 2 * self.shift[1] / h
        m = torch.cat((normalized_grid(h, w), warp), dim=-1)
        self.seen_symmetric = getattr(self, "seen_symmetric", []) + [self.symmetric]
        if self.symmetric:  # DKMv3's (H, 2W, 4): the second half is the other direction (garbage here)
            m = torch.cat((m, torch.full_like(m, 0.3)), dim=1)
        return m, torch.ones(m.shape[:2])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("megadepth_dense")
    make_megadepth_scene(r, scene="0015", n_pairs=3, hw=(120, 160), seed=3)
    make_megadepth_scene(r, scene="0022", n_pairs=2, hw=(96, 128), seed=4)
    return r


@pytest.mark.parametrize("shift,pck,epe", [((0.0, 0.0), (100, 100, 100), 0.0),
                                           ((2.0, 0.0), (0, 100, 100), 2.0),
                                           ((3.0, 4.0), (0, 0, None), 5.0)])  # exactly 5 px: "< 5" is rounding's
def test_oracle_and_shifted_warps_score_what_the_shift_gives(root, shift, pck, epe):
    bench = MegadepthDenseBenchmark(root)
    assert len(bench) == 5 and bench.num_listed == 5
    metrics = bench.benchmark(DenseOracle(bench, 48, 80, shift))  # another aspect ratio than the images
    for t, expected in zip((1, 3, 5), pck):
        if expected is not None:
            assert metrics[f"pck@{t}"] == pytest.approx(expected), (t, metrics)
    assert metrics["epe"] == pytest.approx(epe, abs=1e-3)
    assert (metrics["num_pairs"], metrics["num_failed"], metrics["num_without_gt"]) == (5, 0, 0)
    assert all(r["num_gt"] > 500 for r in bench.last_records)


def test_a_symmetric_matcher_matches_one_direction_during_the_benchmark(root):
    """Only the query -> support half of a symmetric DKMv3 match would be scored, which is the
    one-directional match: the benchmark turns ``symmetric`` off while it runs and restores it."""
    bench = MegadepthDenseBenchmark(root, scenes=["0022"])
    oracle = DenseOracle(bench, 40, 56, (2.0, 0.0), symmetric=True)
    metrics = bench.benchmark(oracle)
    assert (metrics["pck@1"], metrics["pck@3"]) == (0.0, 100.0)
    assert oracle.seen_symmetric == [False, False] and oracle.symmetric is True


def test_failed_pairs_score_zero_and_pairs_without_ground_truth_are_counted(root):
    bench = MegadepthDenseBenchmark(root)
    oracle = DenseOracle(bench, 48, 64)
    first = next(iter(oracle.table))
    del oracle.table[first]  # this pair raises KeyError in match(): a failure
    records = bench.evaluate_pairs(oracle, progress=False)
    failed = [r for r in records if r["failed"]]
    assert len(failed) == 1 and "KeyError" in failed[0]["reason"]
    metrics = bench.compute_metrics(records)
    assert metrics["pck@1"] == pytest.approx(80.0) and metrics["epe"] == pytest.approx(0.0, abs=1e-3)
    no_gt = dict(records[1], num_gt=0, epe=float("nan"), **{"pck@1": float("nan")})
    metrics = bench.compute_metrics([records[0], no_gt, *records[2:]])
    assert metrics["num_without_gt"] == 1 and metrics["num_pairs"] == 5
    assert metrics["pck@1"] == pytest.approx(100 * 3 / 4)  # the failed pair counts, the unscorable one not


def test_pairs_are_a_seeded_subset_and_sparse_matchers_are_refused(root):
    a = MegadepthDenseBenchmark(root, num_pairs=3, seed=1)
    b = MegadepthDenseBenchmark(root, num_pairs=3, seed=1)
    c = MegadepthDenseBenchmark(root, num_pairs=3, seed=2)
    assert a.pairs() == b.pairs() and len(a) == 3 and a.num_listed == 3
    assert len({tuple(p) for p in a.pairs() + c.pairs()}) > 3
    assert a.pair_id(a.pairs()[0]).startswith(("0015/", "0022/"))
    with pytest.raises(ValueError, match="num_pairs=0"):
        MegadepthDenseBenchmark(root, num_pairs=0)
    with pytest.raises(FileNotFoundError, match="0099.npy"):
        MegadepthDenseBenchmark(root, scenes=["0099"])
    from dkm.models.sift import SiftMatcher

    with pytest.raises(TypeError, match="not a dense matcher"):
        a.evaluate_pairs(SiftMatcher(), progress=False)


def test_config_is_the_python_default_and_check_reads_depths(root, tmp_path):
    import inspect
    import shutil

    cfg = protocol("megadepth_dense")
    a, b = MegadepthDenseBenchmark(root), BENCHMARKS["megadepth_dense"](root, **cfg)
    skip = {"_pairs", "last_records", "data_root", "_infos"}
    assert {k: v for k, v in vars(a).items() if k not in skip} == {k: v for k, v in vars(b).items() if k not in skip}
    params = set().union(*(inspect.signature(c.__init__).parameters for c in type(a).__mro__ if "__init__" in vars(c)))
    assert set(cfg) <= params
    assert isinstance(build_benchmark({"name": "megadepth_dense", "data_root": str(root)}), MegadepthDenseBenchmark)
    from dkm.benchmarks.check import check_tree

    assert check_tree("megadepth_dense", root) == (5, [])
    root = shutil.copytree(root, tmp_path / "copy")
    victim = next((root / "phoenix").rglob("0015/dense0/depths/1_0.h5"))
    victim.unlink()
    n, problems = check_tree("megadepth_dense", root)
    assert n == 5 and len(problems) == 1 and "1_0.h5" in problems[0]
    assert (REPO / "conf" / "callbacks" / "megadepth_dense.yaml").is_file()


def test_a_scene_info_without_a_key_is_named_for_training_and_benchmark(tmp_path):
    from dkm.data.megadepth import build_megadepth

    make_megadepth_scene(tmp_path, scene="0015", n_pairs=1)
    path = tmp_path / "prep_scene_info" / "0015.npy"
    info = np.load(path, allow_pickle=True).item()
    del info["overlaps"]
    np.save(path, info, allow_pickle=True)
    for build in (lambda: MegadepthDenseBenchmark(tmp_path, scenes=["0015"]),
                  lambda: build_megadepth(tmp_path, exclude_scenes=())):
        with pytest.raises(KeyError, match=r"0015.npy: scene info lacks \['overlaps'\]"):
            build()
