"""DKMv3 building blocks and API on small random inputs (no fixtures): local correlation, KDE,
sampling modes, training forward/backward, fast vs faithful path, reduced precision, batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dkm import build_model
from dkm.geometry.coords import normalized_grid
from dkm.models.local_correlation import local_correlation
from dkm.models.sampling import SAMPLE_MODES, kde_density, sample_matches


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
