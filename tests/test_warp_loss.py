"""Ground-truth warps and the training loss against the reference (../shared/fixtures/geometry_parity.npz)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import load_npz
import torch

from dkm.geometry.coords import normalized_grid
from dkm.geometry.warp import gt_warp, warp_kpts
from dkm.losses import DKMLoss


@pytest.fixture(scope="module")
def geo(fixtures_dir):
    return load_npz(fixtures_dir, "geometry_parity.npz")


@pytest.mark.parametrize("dtype,prefix", [(torch.float64, "wk_"), (torch.float32, "wk32_")])
def test_depth_warp_matches_reference(geo, dtype, prefix):
    t = lambda k: torch.from_numpy(geo[k]).to(dtype)  # noqa: E731
    d1, d2 = t("depth1"), t("depth2")
    valid, warped = warp_kpts(t("wk_kpts0"), torch.stack([d1, d2]), torch.stack([d2, d1]), t("wk_T_0to1"),
                              t("wk_K0"), t("wk_K1"))
    np.testing.assert_array_equal(valid.numpy(), geo[prefix + "mask"])
    ref = geo[prefix + "warped"]
    m = geo[prefix + "mask"]
    np.testing.assert_allclose(warped.numpy()[m], ref[m], rtol=0, atol=1e-12 if dtype == torch.float64 else 2e-6)
    np.testing.assert_allclose(valid.double().mean(1).numpy(), [0.679, 0.570], atol=1e-3)


def test_loss_matches_reference_value_and_gradients(geo):
    t = lambda k: torch.from_numpy(geo[k])  # noqa: E731
    batch = {"query_depth": torch.stack([t("depth1"), t("depth2")]),
             "support_depth": torch.stack([t("depth2"), t("depth1")]),
             "K1": t("loss_K1"), "K2": t("loss_K2"), "T_1to2": t("loss_T_1to2")}
    outs = {s: {"dense_flow": t(f"loss_in_flow_s{s}").clone().requires_grad_(),
                "dense_certainty": t(f"loss_in_cert_s{s}").clone().requires_grad_()} for s in (32, 16, 8, 4, 2, 1)}
    total, logs = DKMLoss()(outs, batch)
    total.backward()
    assert abs(total.item() - float(geo["loss_total"])) <= 1e-5 * float(geo["loss_total"])
    for s in (32, 16, 8, 4, 2, 1):
        assert logs[f"ce_{s}"].item() == pytest.approx(float(geo[f"loss_ce_s{s}"]), rel=1e-6)
        assert logs[f"regression_{s}"].item() == pytest.approx(float(geo[f"loss_depth_s{s}"]), rel=1e-6)
        for key, ref in (("dense_flow", geo[f"loss_grad_flow_s{s}"]), ("dense_certainty", geo[f"loss_grad_cert_s{s}"])):
            # relative to the scale's largest reference gradient (as small as 3e-5 at fine scales: an absolute
            # tolerance of that size would let a missing gradient pass)
            assert np.abs(ref).max() > 0, (s, key)
            np.testing.assert_allclose(outs[s][key].grad.numpy(), ref, rtol=1e-3, atol=1e-2 * np.abs(ref).max(),
                                       err_msg=f"scale {s} {key}")
        # the gating at scales <= 8 leaves exactly the reference's supervised pixels
        assert logs[f"valid_{s}"].item() == pytest.approx(float((geo[f"loss_prob_s{s}"] > 0).mean()), abs=1e-6)


def test_homography_ground_truth_shares_the_interface():
    b, h, w = 2, 12, 16
    shift = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    shift[1, 0, 2] = 2.0  # 2 px to the right (image width 32 -> 0.125 in normalized units)
    batch = {"H_1to2": shift, "query": torch.zeros(b, 3, 24, 32), "support": torch.zeros(b, 3, 24, 32)}
    warp, valid = gt_warp(batch, h, w)
    grid = normalized_grid(h, w, dtype=torch.float64)
    torch.testing.assert_close(warp[0], grid)
    assert valid[0].all()
    torch.testing.assert_close(warp[1, ..., 0], grid[..., 0] + 2 * 2.0 / 32)
    assert not valid[1, :, -1].any() and valid[1, :, :-1].all()  # the last column leaves the image
    # the loss is zero regression error and low BCE for a perfect, confident prediction
    outs = {s: {"dense_flow": warp.permute(0, 3, 1, 2).float().clone(),
                "dense_certainty": torch.where(valid, 20.0, -20.0)[:, None].float()} for s in (1,)}
    total, logs = DKMLoss()(outs, batch)
    assert logs["regression_1"].item() < 1e-6 and total.item() < 1e-6
    with pytest.raises(KeyError, match="ground truth"):
        gt_warp({"query": batch["query"]}, h, w)
