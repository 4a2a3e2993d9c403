"""The dense HPatches benchmark (EPE / PCK of a dense warp against the ground-truth homography).

The oracles build their warps from the ``H_1_k`` files by hand (numpy: pixel centres on integers,
``u = (j + 0.5) W / w - 0.5`` for column ``j`` of a ``w``-wide output grid), the benchmark through
``dkm.geometry.coords`` and torch: an oracle scores PCK 100 and EPE 0, a warp shifted by a known number
of pixels scores what the shift gives, on synthetic sequences and on the real ones of shared/realdata.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dkm.benchmarks import BENCHMARKS, HpatchesDenseBenchmark
from dkm.evaluation import build_benchmark
from synthetic_benchmarks import image_key, make_hpatches
from test_benchmarks import REPO, protocol


class HomographyOracle:
    """``match(im_k, im_1)`` returns the ground-truth warp of image k's ``h x w`` output grid into image 1,
    its support points moved by ``shift`` pixels of image 1 (x, y), or by ``shift(seq, k)``."""

    def __init__(self, root, h: int, w: int, shift=(0.0, 0.0), symmetric=False):
        self.h_resized, self.w_resized, self.shift, self.symmetric = h, w, shift, symmetric
        self.seen_symmetric = []
        self.table, self.key_of, self.num_inside = {}, {}, {}
        for seq in sorted((root / "hpatches-sequences-release").iterdir()):
            im1 = Image.open(seq / "1.ppm").convert("RGB")
            w1, h1 = im1.size
            for k in range(2, 7):
                imk = Image.open(seq / f"{k}.ppm").convert("RGB")
                wk, hk = imk.size
                u = (np.arange(w) + 0.5) * wk / w - 0.5
                v = (np.arange(h) + 0.5) * hk / h - 0.5
                q = np.stack(np.meshgrid(u, v), -1).reshape(-1, 2)
                p = np.c_[q, np.ones(len(q))] @ np.linalg.inv(np.loadtxt(seq / f"H_1_{k}")).T
                p = p[:, :2] / p[:, 2:]
                self.num_inside[f"{seq.name}/1-{k}"] = int(((p > 0) & (p < [w1 - 1, h1 - 1])).all(1).sum())
                p = p + np.asarray(shift(seq.name, k) if callable(shift) else shift)
                warp = np.c_[2 * (q + 0.5) / [wk, hk] - 1, 2 * (p + 0.5) / [w1, h1] - 1].reshape(h, w, 4)
                self.key_of[seq.name, k] = (image_key(imk), image_key(im1))
                self.table[self.key_of[seq.name, k]] = torch.from_numpy(warp)

    def match(self, im_query, im_support, check_cycle_consistency=False):
        m = self.table[(image_key(im_query), image_key(im_support))].clone()
        self.seen_symmetric.append(self.symmetric)
        if self.symmetric:  # DKMv3's (H, 2W, 4): the second half is the other direction (garbage here)
            m = torch.cat((m, torch.full_like(m, 0.3)), dim=1)
        return m, torch.ones(m.shape[:2])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_hpatches(tmp_path_factory.mktemp("hpatches_dense"), seqs=("i_synth", "v_one", "v_two"),
                         hw=(120, 160), seed=2)


@pytest.mark.parametrize("shift,pck,epe", [((0.0, 0.0), (100, 100, 100), 0.0),
                                           ((2.0, 0.0), (0, 100, 100), 2.0),
                                           ((3.0, 4.0), (0, 0, None), 5.0)])  # exactly 5 px: "< 5" is rounding's
def test_oracle_and_shifted_warps_score_what_the_shift_gives(root, shift, pck, epe):
    bench = HpatchesDenseBenchmark(root)
    assert len(bench) == 10 and {p[0] for p in bench.pairs()} == {"v_one", "v_two"}  # viewpoint only
    oracle = HomographyOracle(root, 48, 80, shift)  # another aspect ratio than the images
    metrics = bench.benchmark(oracle)
    for t, expected in zip((1, 3, 5), pck):
        if expected is not None:
            assert metrics[f"pck@{t}"] == pytest.approx(expected), (t, metrics)
    assert metrics["epe"] == pytest.approx(epe, abs=1e-9)
    assert all(metrics[f"epe_1-{k}"] == pytest.approx(epe, abs=1e-9) for k in range(2, 7))
    assert (metrics["num_pairs"], metrics["num_failed"], metrics["num_without_gt"]) == (10, 0, 0)
    # the homographies move the corners by up to 8 %: most query points land inside image 1, not all
    counts = {r["pair_id"]: r["num_gt"] for r in bench.last_records}
    assert counts == {i: n for i, n in oracle.num_inside.items() if i.startswith("v_")}
    assert all(1500 < n <= 48 * 80 for n in counts.values()) and min(counts.values()) < 48 * 80


def test_the_release_scales_hp240_errors_by_the_query_images_size(root, tmp_path):
    """Images k of another size than image 1 (200 x 150 against 160 x 120, H_1_k rescaled to match): a
    2.5 px error in image 1 becomes 2.5 * 240 / 200 = 3.0 px, not 2.5 * 240 / 160 = 3.75."""
    import shutil

    seq = tmp_path / "hpatches-sequences-release" / "v_one"
    shutil.copytree(root / "hpatches-sequences-release" / "v_one", seq)
    S = np.diag([200 / 160, 150 / 120, 1.0])
    for k in range(2, 7):
        Image.open(seq / f"{k}.ppm").resize((200, 150), Image.BICUBIC).save(seq / f"{k}.ppm")
        # integer pixel centres: x' = (x + 0.5) * s - 0.5
        C = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
        np.savetxt(seq / f"H_1_{k}", np.linalg.inv(C) @ S @ C @ np.loadtxt(seq / f"H_1_{k}"))
    bench = HpatchesDenseBenchmark(tmp_path, hp240=True)
    oracle = HomographyOracle(tmp_path, 24, 32, (2.5, 0.0))
    metrics = bench.benchmark(oracle)
    assert metrics["epe"] == pytest.approx(2.5 * 240 / 200)  # the x error times 240 / w_k
    assert (metrics["pck@1"], metrics["pck@5"], metrics["num_pairs"]) == (0.0, 100.0, 5)
    plain = HpatchesDenseBenchmark(tmp_path).benchmark(oracle)
    assert plain["epe"] == pytest.approx(2.5) and plain["pck@3"] == 100.0
    # the release's call form benchmark(model, ransac_thr, hp240): hp240 for that call only
    assert HpatchesDenseBenchmark(tmp_path).benchmark(oracle, 3.0, hp240=True)["epe"] == pytest.approx(3.0)
    assert bench.benchmark(oracle, hp240=False)["epe"] == pytest.approx(2.5) and bench.hp240 is True


def test_a_symmetric_matcher_matches_one_direction_during_the_benchmark(root):
    bench = HpatchesDenseBenchmark(root, exclude_sequences=["v_two"])
    oracle = HomographyOracle(root, 30, 40, (0.0, 2.0), symmetric=True)
    metrics = bench.benchmark(oracle)
    assert (metrics["pck@1"], metrics["pck@3"], metrics["num_pairs"]) == (0.0, 100.0, 5)
    assert oracle.seen_symmetric == [False] * 5 and oracle.symmetric is True


def test_metrics_are_means_over_pairs_and_per_image_index(root):
    """Pair (seq, k) shifted by k - 1.5 px (v_one: 0.5 ... 4.5) or 1.5 k - 1.25 px (v_two: 1.75 ... 7.75):
    the EPE of index k is the mean of its two pairs, the EPE the mean over the ten pairs, 3.625, whatever
    their numbers of points (pooling the points would weigh the pairs by them); PCK@t is the share of
    pairs below t px (no shift lies on a threshold)."""
    bench = HpatchesDenseBenchmark(root)
    shift = {"v_one": lambda k: k - 1.5, "v_two": lambda k: 1.5 * k - 1.25}
    metrics = bench.benchmark(HomographyOracle(root, 24, 32, lambda seq, k: (shift[seq](k) if seq in shift else 0.0, 0.0)))
    assert [metrics[f"epe_1-{k}"] for k in range(2, 7)] == pytest.approx([1.125, 2.375, 3.625, 4.875, 6.125])
    assert metrics["epe"] == pytest.approx(3.625)
    counts = [r["num_gt"] for r in bench.last_records]
    assert len(set(counts)) > 1  # pairs of different weights: a pooled mean would differ
    assert (metrics["pck@1"], metrics["pck@3"], metrics["pck@5"]) == pytest.approx((10.0, 40.0, 80.0))


def test_error_record_counts_errors_strictly_below_each_threshold(root):
    rec = HpatchesDenseBenchmark(root).error_record(torch.tensor([0.5, 1.0, 2.9, 3.0, 7.0], dtype=torch.float64))
    assert rec == {"num_gt": 5, "epe": pytest.approx(14.4 / 5), "pck@1": 0.2, "pck@3": 0.6, "pck@5": 0.8}
    empty = HpatchesDenseBenchmark(root).error_record(torch.zeros(0, dtype=torch.float64))
    assert empty["num_gt"] == 0 and np.isnan(empty["epe"]) and np.isnan(empty["pck@1"])


def test_the_support_frame_is_image_1_and_the_wrong_direction_fails(root):
    """A warp from image 1 into image k (the homography's own direction) is not what the protocol
    matches: the oracle has no entry for that order, so every pair fails and scores PCK 0."""
    bench = HpatchesDenseBenchmark(root)
    oracle = HomographyOracle(root, 24, 32)
    oracle.table = {(b, a): v for (a, b), v in oracle.table.items()}
    records = bench.evaluate_pairs(oracle, progress=False)
    assert all(r["failed"] and "KeyError" in r["reason"] for r in records)
    metrics = bench.compute_metrics(records)
    assert metrics["pck@5"] == 0.0 and np.isnan(metrics["epe"]) and metrics["num_failed"] == 10


def test_failed_pairs_score_zero_and_pairs_without_ground_truth_are_counted(root):
    bench = HpatchesDenseBenchmark(root)
    oracle = HomographyOracle(root, 24, 32)
    del oracle.table[oracle.key_of["v_one", 2]]  # this pair raises KeyError in match(): a failure
    records = bench.evaluate_pairs(oracle, progress=False)
    failed = [r for r in records if r["failed"]]
    assert len(failed) == 1 and failed[0]["k"] == 2 and "KeyError" in failed[0]["reason"]
    metrics = bench.compute_metrics(records)
    assert metrics["pck@1"] == pytest.approx(90.0) and metrics["epe"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["epe_1-2"] == pytest.approx(0.0, abs=1e-9)  # from the other sequence's pair 1-2
    no_gt = dict(records[1], num_gt=0, epe=float("nan"), **{"pck@1": float("nan")})
    metrics = bench.compute_metrics([records[0], no_gt, *records[2:]])
    assert metrics["num_without_gt"] == 1 and metrics["num_pairs"] == 10
    assert metrics["pck@1"] == pytest.approx(100 * 8 / 9)  # the failed pair counts, the unscorable one not


def test_config_is_the_python_default_and_check_reads_homographies(root, tmp_path):
    import shutil

    from dkm.benchmarks.check import check_tree
    from dkm.models.sift import SiftMatcher

    assert isinstance(build_benchmark({"name": "hpatches_dense", "data_root": str(root)}), HpatchesDenseBenchmark)
    assert BENCHMARKS["hpatches_dense"](root, **protocol("hpatches_dense_dkmv3")).resolution == (660, 880)
    with pytest.raises(TypeError, match="not a dense matcher"):
        HpatchesDenseBenchmark(root).evaluate_pairs(SiftMatcher(), progress=False)
    assert check_tree("hpatches_dense", root) == (10, [])
    root = shutil.copytree(root, tmp_path / "copy")
    (root / "hpatches-sequences-release" / "v_two" / "H_1_4").write_text("1 0 0\n0 1 0\n")
    n, problems = check_tree("hpatches_dense", root)
    assert n == 10 and len(problems) == 1 and "v_two/1-4" in problems[0] and "H_1_4" in problems[0]
    assert (REPO / "conf" / "callbacks" / "hpatches_dense.yaml").is_file()


def test_real_sequences_oracle_and_shift(realdata_dir):
    """On the real HPatches sequences (850x680 and 788x522 images, zooms up to x2.8): the ground-truth
    warp at the v11 internal resolution scores 100 %, the same warp moved 1.5 px scores EPE 1.5."""
    root = realdata_dir / "hpatches_real"
    if not (root / "hpatches-sequences-release").exists():
        pytest.skip("shared/realdata/hpatches_real is absent")
    bench = HpatchesDenseBenchmark(root)
    exact = bench.benchmark(HomographyOracle(root, 384, 512))
    assert (exact["pck@1"], exact["epe"], exact["num_pairs"], exact["num_failed"]) == (100.0, pytest.approx(0, abs=1e-9), 10, 0)
    # v_boat 1-6 zooms in x2.8: only the central part of image 6's grid lies inside image 1
    assert min(r["num_gt"] for r in bench.last_records) > 10000
    shifted = bench.benchmark(HomographyOracle(root, 384, 512, (1.5, 0.0)))
    assert (shifted["pck@1"], shifted["pck@3"]) == (0.0, 100.0) and shifted["epe"] == pytest.approx(1.5)


def test_validation_pictures_of_a_symmetric_matcher_show_the_whole_grid(root, monkeypatch):
    """The callback's warp pictures come from a match under the benchmark's settings (symmetric off):
    a symmetric matcher's picture is the one of the same matcher built one-directional."""
    from types import SimpleNamespace

    import dkm.lightning.callbacks as callbacks

    logged = []
    monkeypatch.setattr(callbacks, "log_warp_image", lambda logger, key, img, step, caption: logged.append(img))
    bench = HpatchesDenseBenchmark(root, exclude_sequences=["v_two"])
    callback = callbacks.BenchmarkCallback("hpatches_dense", bench, every_n_steps=1, num_log_pairs=1)
    trainer = SimpleNamespace(logger=object(), global_step=0)
    for symmetric in (True, False):
        callback._log_pairs(trainer, HomographyOracle(root, 30, 40, symmetric=symmetric))
    assert len(logged) == 2 and logged[0].shape == logged[1].shape and logged[0].shape[:2] == (30, 4 * 40)
    assert (logged[0] == logged[1]).all()
