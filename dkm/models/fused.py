"""Inference kernels of the fast path: BatchNorm folded into the preceding convolution, and a
convolution with its ReLU (and residual add) fused into one oneDNN primitive on CPU.

Both compute the same function as ``relu(bn(conv(x)) [+ residual])`` with different rounding
(the parity tests bound the difference). They are for inference only: gradients never flow through
the fused op (it is used only when autograd is off) and folding reads BatchNorm's running
statistics, i.e. eval-mode BatchNorm.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.device import reduced_precision_is_native


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(C_out, C_in/groups, k, k)`` (channels-last strides) and bias ``(C_out,)`` of the
    convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode. Computed from the current
    parameters on every call (one multiply over the weight), so it never goes stale when the
    weights change."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    if torch.is_grad_enabled() and (scale.requires_grad or conv.weight.requires_grad):
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    else:  # written channels-last, the layout oneDNN wants for channels-last inputs (no copy per call)
        weight = torch.mul(conv.weight, scale.reshape(-1, 1, 1, 1),
                           out=torch.empty_like(conv.weight, memory_format=torch.channels_last))
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


def _cpu_has_kernels(dtype: torch.dtype) -> bool:
    """Whether oneDNN convolves ``dtype`` (float32, bfloat16 or float16) on this CPU."""
    return dtype == torch.float32 or reduced_precision_is_native("cpu", dtype)


def _onednn_fusable(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether oneDNN's fused convolution (``torch.ops.mkldnn._convolution_pointwise``, the op
    TorchInductor lowers conv+activation to on CPU) can run this convolution (reduced precision only
    where oneDNN supports it on this CPU; elsewhere the op would refuse it on every call)."""
    return (x.device.type == "cpu" and _cpu_has_kernels(x.dtype)
            and not torch.is_grad_enabled() and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def conv2d_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d,
                relu: bool = True, residual: torch.Tensor | None = None,
                padding: tuple[int, int] | None = None) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias) + residual)`` with the stride/padding/dilation/groups of ``conv``.

    ``x`` (B, C_in, H, W), ``residual`` (B, C_out, H', W') or None; ``relu=False`` skips the ReLU;
    ``padding`` (rows, columns) replaces the padding of ``conv``.
    Runs in the autocast dtype when autocast is on (weights cast per call), else in ``x.dtype``.
    On CPU without autograd it is one oneDNN primitive (ReLU and residual add applied while the
    output is still in cache); elsewhere it is ``F.conv2d`` followed by in-place ``add_``/``relu_``.
    On a CPU without native kernels for a reduced dtype (bfloat16 without AVX-512, float16 without
    AVX512-FP16) it rounds the operands to that dtype, convolves them with float32 kernels (at
    float32 speed; PyTorch's generic kernels for the dtype are 10-20x slower) and rounds the result
    to the dtype once: the computation native kernels are meant to do (dtype operands, float32 sums).
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    padding = tuple(conv.padding) if padding is None else tuple(padding)
    if dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and not _cpu_has_kernels(dtype):
        # no kernels for dtype on this CPU: products of dtype-rounded operands summed in float32, rounded once
        def rounded(t):
            return None if t is None else t.to(dtype).float()
        with torch.autocast("cpu", enabled=False):
            out = _convolve(rounded(x), rounded(weight), rounded(bias), conv, relu, rounded(residual), padding)
        return out.to(dtype)
    return _convolve(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), conv, relu,
                     None if residual is None else residual.to(dtype), padding)


def _convolve(x, weight, bias, conv, relu, residual, padding):
    """:func:`conv2d_relu` with every operand in the compute dtype."""
    if _onednn_fusable(x, conv):
        args = (list(padding), list(conv.stride), list(conv.dilation), conv.groups)
        try:
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "relu" if relu else "none",
                                                               [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, weight, bias, *args, "add", None, "relu" if relu else None, [], "")
        except RuntimeError as e:  # a private op: a torch build may lack a kernel for this case
            warnings.warn(f"oneDNN fused convolution unavailable for input {tuple(x.shape)} {x.dtype} ({e}); "
                          "using F.conv2d", RuntimeWarning, stacklevel=3)
    y = F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
    if residual is not None:
        y.add_(residual)
    return torch.relu_(y) if relu else y


def conv_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` through :func:`conv2d_relu` (no activation): the fast path of a plain convolution."""
    return conv2d_relu(x, conv.weight, conv.bias, conv, relu=False)
