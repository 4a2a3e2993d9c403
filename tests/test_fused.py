"""The fast path's inference kernels (dkm/models/fused.py) and the fused encoder against the modules
they replace."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50

from dkm.models.encoder import Encoder
from dkm.models.fused import conv2d_relu, fold_batchnorm


def _randomize_batchnorm(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (8, True)])
def test_folded_convolution_equals_conv_then_eval_batchnorm(groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(16)
    _randomize_batchnorm(bn)
    bn.eval()
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        want = bn(conv(x))
        weight, b = fold_batchnorm(conv, bn)
        got = F.conv2d(x, weight, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["onednn", "reference"])
@pytest.mark.parametrize("residual,relu", [(False, True), (False, False), (True, True)])
def test_conv2d_relu_equals_conv_add_relu(grad, residual, relu):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    x = torch.randn(1, 16, 20, 24).contiguous(memory_format=torch.channels_last)
    res = torch.randn(1, 32, 10, 12).contiguous(memory_format=torch.channels_last) if residual else None
    with torch.set_grad_enabled(grad):
        want = conv(x) + (res if residual else 0)
        want = want.relu() if relu else want
        got = conv2d_relu(x, conv.weight, conv.bias, conv, relu=relu, residual=res)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == (1, 32, 10, 12)


def test_conv2d_relu_follows_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv2d_relu(x, conv.weight, conv.bias, conv)
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        want = conv(x).relu()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("make", [resnet18, resnet50], ids=["resnet18", "resnet50"])
def test_fused_encoder_equals_module_forward(make):
    torch.manual_seed(0)
    enc = Encoder(make())
    _randomize_batchnorm(enc)
    enc.eval()
    images = [torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    with torch.inference_mode():
        fused = enc.forward_fused(images)
        for x, pyr in zip(images, fused):
            want = enc(x)
            assert pyr.keys() == want.keys()
            for s in want:  # same function, different rounding (activations grow to ~1e2 at stride 32)
                assert pyr[s].shape == want[s].shape
                assert (pyr[s] - want[s]).norm() <= 1e-5 * want[s].norm(), s
        upto8 = enc.forward_fused(images[:1], max_stride=8)[0]
    assert sorted(upto8) == [1, 2, 4, 8]


def test_fused_encoder_in_train_mode_is_the_module_forward():
    enc = Encoder(resnet18()).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (pyr,) = enc.forward_fused([x])
    pyr[32].sum().backward()  # autograd works: the module path, with batch statistics
    assert x.grad is not None and enc.backbone.bn1.running_mean.abs().sum() > 0


def test_fast_encoder_keeps_channels_last_for_image_views():
    """A (1, 3, H, W) view of an HWC image (what PIL inputs become) has batch stride 3; .contiguous()
    keeps it, and PyTorch's layout heuristics then fall back to NCHW for every activation (measured:
    grid_sample 4x and max-pooling 7x slower). The fast encoder must hand channels-last features on."""
    from dkm.models.matcher import RegressionMatcher

    matcher = SimpleNamespace(encoder=Encoder(resnet18()).eval())
    image = torch.rand(64, 96, 3).permute(2, 0, 1)[None]  # HWC memory, as from a PIL image
    assert image.stride(0) == 3
    with torch.inference_mode():
        (pyr,) = RegressionMatcher._encode_fast(matcher, image)
    for s in (2, 4, 8, 16, 32):
        assert pyr[s].is_contiguous(memory_format=torch.channels_last), s


def test_conv2d_relu_falls_back_when_the_fused_op_fails(monkeypatch):
    """The oneDNN op is private: where a torch build rejects a case, the reference path answers."""
    import dkm.models.fused as fused

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(fused, "_onednn_fusable", lambda x, conv: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", broken, raising=False)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="fused convolution unavailable"):
        got = conv2d_relu(x, conv.weight, conv.bias, conv)
    with torch.no_grad():
        torch.testing.assert_close(got, conv(x).relu())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("native", [False, True])
def test_reduced_precision_takes_onednn_only_where_the_cpu_runs_it(monkeypatch, native, dtype):
    """float16/bfloat16 convolutions go to oneDNN's fused op only where this CPU supports them
    (oneDNN refuses them on e.g. AVX2-only CPUs; if it still refuses, F.conv2d computes the same
    function and a warning says so); elsewhere float32 kernels convolve the rounded operands."""
    import dkm.models.fused as fused
    import dkm.utils.device as device

    probe = {torch.float16: "cpu_has_native_fp16", torch.bfloat16: "cpu_has_native_bf16"}[dtype]
    supported = getattr(device, probe)()
    monkeypatch.setattr(device, probe, lambda: native)
    onednn_calls = []
    onednn = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise",
                        lambda x, *a: onednn_calls.append(x.dtype) or onednn(x, *a), raising=False)
    conv = nn.Conv2d(4, 4, 1)
    x = torch.randn(1, 4, 8, 8, dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fused._onednn_fusable(x, conv) == native
        assert fused._onednn_fusable(x.float(), conv)
        got = conv2d_relu(x, conv.weight, conv.bias, conv)
        want = F.conv2d(x.float(), conv.weight, conv.bias).relu()
    # claimed supported where the CPU is not: oneDNN refuses and the fallback says so
    assert bool(caught) == (native and not supported), caught
    assert onednn_calls == ([dtype] if native else [torch.float32])  # not native: oneDNN in float32
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_without_cpu_kernels_rounds_operands_and_result(monkeypatch, dtype):
    """Without kernels for the dtype, conv2d_relu computes what native ones do: products of operands
    rounded to the dtype, summed in float32, the sum rounded once. Operand rounding shows in a
    cancellation: (1 + 0.45 ulp) - 1 is 0 after rounding; float32 throughout would give 0.45 ulp."""
    import dkm.utils.device as device

    monkeypatch.setattr(device, {torch.float16: "cpu_has_native_fp16", torch.bfloat16: "cpu_has_native_bf16"}[dtype],
                        lambda: False)
    ulp = torch.finfo(dtype).eps
    conv = nn.Conv2d(2, 1, 1, bias=False)
    x = torch.tensor([1 + 0.45 * ulp, -1.0]).reshape(1, 2, 1, 1)  # float32, rounded under autocast
    weight = torch.ones(1, 2, 1, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        got = conv2d_relu(x, weight, None, conv, relu=False)
    assert got.dtype == dtype and got.item() == 0.0
    assert F.conv2d(x, weight).item() == pytest.approx(0.45 * ulp, rel=1e-3)  # (what float32 alone gives)

    # on random data: PyTorch's own convolution in the dtype (its generic kernels, or oneDNN's where native)
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x, res = torch.randn(1, 8, 12, 16), torch.randn(1, 8, 12, 16)
    with torch.no_grad():
        got = conv2d_relu(x.to(dtype), conv.weight, conv.bias, conv, residual=res.to(dtype))
        want = (F.conv2d(x.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype), padding=1) + res.to(dtype)).relu()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=2 * ulp)


@pytest.mark.parametrize("kernel_size", [5, 3, 1])
@pytest.mark.parametrize("h", [23, 24, 9])
@pytest.mark.parametrize("bands", [2, 3, 5])
def test_refiner_in_row_bands_equals_one_piece(h, bands, kernel_size):
    """Large refiner activations are processed in row bands with the neighbours' border rows; the
    result must be that of the whole image (zero padding only at the image border)."""
    from dkm.models.decoder import ConvRefiner

    torch.manual_seed(0)
    refiner = ConvRefiner(8, 16, hidden_blocks=3, kernel_size=kernel_size)
    _randomize_batchnorm(refiner)
    refiner.eval()
    x, y = torch.randn(1, 4, h, 11), torch.randn(1, 4, h, 11)
    flow = torch.rand(1, 2, h, 11) * 2 - 1
    with torch.inference_mode():
        whole = refiner(x, y, flow, fast=True)
        nbytes = 16 * h * 11 * 4
        refiner.band_bytes = -(-nbytes // bands)  # -> `bands` bands (fewer where a band would be shorter than 2 rows)
        banded = refiner(x, y, flow, fast=True)
        reference = refiner(x, y, flow, fast=False)
    for a, b, r in zip(banded, whole, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
