"""DKMv3 building blocks and API on small random inputs (no fixtures): local correlation, KDE,
sampling modes, training forward/backward, fast vs faithful path, reduced precision, batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dkm import build_model
from dkm.geometry.coords import normalized_grid
from dkm.models import decoder as decoder_module
from dkm.models.local_correlation import chunk_for_budget, local_correlation, rows_for_budget
from dkm.models.sampling import SAMPLE_MODES, kde_density, mode_weights, sample_matches


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model({"arch": "dkmv3_indoor", "h": 64, "w": 96}).eval()


def test_local_correlation_by_hand_and_chunked():
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    flow = normalized_grid(6, 7, batch=2).permute(0, 3, 1, 2).contiguous()
    corr = local_correlation(x, y, 1, flow=flow)  # identity flow: integer-pixel neighbours
    assert corr.shape == (2, 9, 6, 7)
    # offset k = (dy + 1) * 3 + (dx + 1); pixel (i, j) with neighbour (i + dy, j + dx), zero outside
    for k, (dy, dx) in enumerate([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]):
        i, j = 2, 3
        expected = (x[1, :, i, j] * y[1, :, i + dy, j + dx]).sum() / 5 ** 0.5
        assert torch.isclose(corr[1, k, i, j], expected, atol=1e-5)
    assert torch.allclose(corr[0, 0, 0, 0], torch.tensor(0.0))  # (-1, -1) of the corner: padding
    for chunk in (1, 4, 9):
        torch.testing.assert_close(local_correlation(x, y, 1, flow=flow, chunk=chunk), corr, atol=1e-5, rtol=0)
        for rows in (1, 4, 6):  # bands of query rows, the last one shorter for 4
            torch.testing.assert_close(local_correlation(x, y, 1, flow=flow, chunk=chunk, rows=rows), corr,
                                       atol=1e-5, rtol=0)


def test_correlation_windows_stay_in_budget():
    """DKMv3 outdoor's stride-8 correlation at 864x1152 (C = 512, 108x144, 49 offsets): 4 offsets per
    call (the floor), and rows split so that one window holds at most the 7M-element budget."""
    chunk = chunk_for_budget(1, 512, 108, 144)
    rows = rows_for_budget(1, 512, 144, chunk)
    assert chunk == 4 and rows == 24 and 512 * rows * 144 * chunk <= 7 << 20 < 512 * (rows + 1) * 144 * chunk
    assert rows_for_budget(1, 64, 32, 4) == (7 << 20) // (64 * 32 * 4)  # small inputs: one band (rows >= h)
    assert rows_for_budget(1, 1 << 20, 1 << 10, 49) == 1


def test_kde_is_chunk_invariant_and_matches_the_dense_formula():
    torch.manual_seed(0)
    x = torch.rand(300, 4) * 2 - 1
    dense = torch.exp(-torch.cdist(x.double(), x.double()) ** 2 / 0.02).sum(-1)
    for budget in (300, 300 * 7, 1 << 22):
        # float32 squared distances by the |a|^2 + |x|^2 - 2ax expansion (as torch.cdist): ~2e-5 relative
        torch.testing.assert_close(kde_density(x, 0.1, max_elements=budget).double(), dense, rtol=1e-4, atol=0)
    torch.testing.assert_close(kde_density(x, 0.1, at=x[:5]), kde_density(x, 0.1)[:5], rtol=1e-4, atol=0)


@pytest.mark.parametrize("mode", SAMPLE_MODES)
def test_sample_modes_are_seeded_and_without_replacement(mode):
    torch.manual_seed(0)
    m = torch.rand(2000, 4) * 2 - 1
    c = torch.rand(2000) * (torch.rand(2000) > 0.3)
    i1, _ = sample_matches(m, c, 100, mode, generator=torch.Generator().manual_seed(1))
    i2, _ = sample_matches(m, c, 100, mode, generator=torch.Generator().manual_seed(1))
    assert torch.equal(i1, i2) and i1.numel() == 100 and i1.unique().numel() == 100
    if not mode.startswith("naive"):
        assert (c[i1] > 0).all()


def test_stage_one_weights_of_each_mode():
    c = torch.tensor([0.0, 0.001, 0.04, 0.05, 0.06, 0.125, 0.9, 1.0])
    torch.testing.assert_close(mode_weights(c, "proportional"), c)
    torch.testing.assert_close(mode_weights(c, "threshold_balanced"),
                               torch.tensor([0.0, 0.001, 0.04, 0.05, 1.0, 1.0, 1.0, 1.0]))  # > 0.05 counts as 1
    torch.testing.assert_close(mode_weights(c, "pow"), c ** (1 / 3))
    assert mode_weights(c, "pow")[5].item() == pytest.approx(0.5)  # 0.125 ** (1/3)
    torch.testing.assert_close(mode_weights(c, "naive_balanced"), torch.ones(8))


def test_balanced_sampling_drops_isolated_matches_and_plain_sampling_keeps_them():
    # 1900 matches in a tight cluster and 100 isolated ones on a lattice of spacing 0.5 (kernel std 0.1: each is
    # its own only neighbour, density ~1 < 10), all of certainty 1
    rng = np.random.default_rng(0)
    cluster = torch.from_numpy(rng.normal(0, 0.01, (1900, 4))).float()
    ticks = torch.tensor([-1.0, -0.5, 0.5, 1.0])
    lattice = torch.cartesian_prod(ticks, ticks, ticks, ticks)[torch.from_numpy(rng.permutation(256)[:100])]
    matches, certainty = torch.cat([cluster, lattice]), torch.ones(2000)
    isolated = lambda idx: int((idx >= 1900).sum())  # noqa: E731
    balanced = [isolated(sample_matches(matches, certainty, 200, "threshold_balanced",
                                        generator=torch.Generator().manual_seed(s))[0]) for s in range(5)]
    plain = [isolated(sample_matches(matches, certainty, 200, "threshold",
                                     generator=torch.Generator().manual_seed(s))[0]) for s in range(5)]
    assert balanced == [0] * 5, balanced
    assert 20 <= sum(plain) <= 80, plain  # uniform draws: 5% of 5 x 200 = 50 expected


def test_train_forward_backward_reaches_v3_parameters(tiny):
    tiny.train()
    try:
        b = {"query": torch.randn(1, 3, 64, 96), "support": torch.randn(1, 3, 64, 96)}
        out = tiny(b)
        assert sorted(out) == [1, 2, 4, 8, 16, 32]
        sum(o["dense_flow"].square().mean() + o["dense_certainty"].mean() for o in out.values()).backward()
        assert tiny.decoder.conv_refiner["16"].disp_emb.weight.grad.abs().sum() > 0
        assert tiny.encoder.net.layer1[0].conv1.weight.grad.abs().sum() > 0
        assert tiny.encoder.net.bn1.training  # DKMv3 trains the backbone's BatchNorm
    finally:
        tiny.zero_grad(set_to_none=True)
        tiny.eval()


def test_fast_faithful_and_bfloat16_agree_and_batches_work(tiny):
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((2, 3, 80, 100), dtype=np.float32))
    b = a.flip(-1)
    w0, c0 = tiny.match(a, b, fast=False)
    w1, c1 = tiny.match(a, b, fast=True)
    w2, c2 = tiny.match(a, b, fast=True, dtype=torch.bfloat16)
    assert w0.shape == (2, 64, 192, 4) and c0.shape == (2, 64, 192)
    torch.testing.assert_close(w1, w0, atol=1e-4, rtol=0)
    torch.testing.assert_close(c1, c0, atol=1e-4, rtol=0)
    assert (w2 - w0).abs().max() < 0.02 and (c2 - c0).abs().max() < 0.05
    w_single, _ = tiny.match(a[1], b[1], fast=True)
    torch.testing.assert_close(w_single, w1[1], atol=1e-5, rtol=0)
    grid = normalized_grid(64, 96)
    torch.testing.assert_close(w1[0, :, :96, :2], grid)
    torch.testing.assert_close(w1[0, :, 96:, 2:], grid)


def test_fast_path_correlation_in_row_bands_gives_the_same_match(tiny, monkeypatch):
    """The refiners' correlation windows sampled one query row at a time (as large inputs are) match the
    windows of whole feature maps (the tiny inputs' default)."""
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.random((1, 3, 80, 100), dtype=np.float32))
    w1, c1 = tiny.match(a, a.flip(-1), fast=True)
    calls = []

    def one_row(*args, **kwargs):
        calls.append(args)
        return 1

    monkeypatch.setattr(decoder_module, "rows_for_budget", one_row)
    w2, c2 = tiny.match(a, a.flip(-1), fast=True)
    assert calls  # the decoder asked for the bands
    torch.testing.assert_close(w2, w1, atol=1e-6, rtol=0)
    torch.testing.assert_close(c2, c1, atol=1e-6, rtol=0)


def test_upsampling_switched_on_after_construction_runs_at_upsample_res():
    """``model.upsample_preds = True`` on DKMv3 indoor (built without the pass) refines at the
    release's (864, 1152) unless ``upsample_res`` says otherwise, also for images of different
    sizes; without an ``upsample_res`` it is a clear error, not a pass at the images' own size."""
    torch.manual_seed(0)
    model = build_model({"arch": "dkmv3_indoor", "h": 48, "w": 64}).eval()
    assert model.upsample_res == (864, 1152) and not model.upsample_preds
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((1, 3, 90, 120), dtype=np.float32))
    b = torch.from_numpy(rng.random((1, 3, 70, 130), dtype=np.float32))
    model.upsample_preds, model.upsample_res = True, (64, 96)
    warp, cert = model.match(a, b)
    assert warp.shape == (1, 64, 192, 4) and cert.shape == (1, 64, 192)
    model.upsample_res = None
    with pytest.raises(ValueError, match="upsample_res is None"):
        model.match(a, b)
