"""What the current machine can do fast (used to warn about, and to benchmark, reduced precision)."""
from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch


def _onednn_check(name: str) -> bool:
    """``torch.ops.mkldnn.<name>()``; False where this torch build does not expose it."""
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU: torch's check, AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT. They are fast with AVX512-BF16 or AMX; on older AVX-512 CPUs oneDNN converts
    through float32. Elsewhere (e.g. AVX2-only CPUs) PyTorch's generic kernels run them, many times
    slower than float32; dkm's fast path then convolves bfloat16-rounded operands with float32 kernels
    (:func:`dkm.models.fused.conv2d_relu`)."""
    return _onednn_check("_is_mkldnn_bf16_supported")


@functools.lru_cache(maxsize=None)
def cpu_has_native_fp16() -> bool:
    """Whether oneDNN runs float16 convolutions on this CPU: torch's check, AVX512-FP16 (e.g. Intel
    Xeon since Sapphire Rapids) or AVX-NE-CONVERT; faster than float32 only with AMX-FP16 (Xeon since
    Granite Rapids), see :func:`reduced_precision_is_faster`. Elsewhere PyTorch's generic kernels run
    them, many times slower than float32 (dkm's fast path: float32 kernels on rounded operands)."""
    return _onednn_check("_is_mkldnn_fp16_supported")


#: what a CPU needs for reduced-precision convolutions faster than float32 (named in warnings)
CPU_FAST_NEEDS = {torch.bfloat16: "AVX512-BF16 or AMX", torch.float16: "AMX-FP16"}
#: what a CUDA GPU needs for them
CUDA_FAST_NEEDS = {torch.bfloat16: "compute capability 8.0 (Ampere) or newer",
                   torch.float16: "compute capability 7.0 (Volta) or newer"}
#: /proc/cpuinfo flags of those instruction sets
_CPU_FAST_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float16: {"amx_fp16"}}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The x86 feature flags of the first CPU in /proc/cpuinfo (e.g. ``{"avx512f", "amx_bf16", ...}``);
    empty where there is no such line (other operating systems and architectures)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def reduced_precision_is_native(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` (bfloat16/float16) convolutions run in optimized kernels on ``device``
    (on CPU: oneDNN's) rather than in PyTorch's generic, many times slower ones."""
    device = torch.device(device)
    if device.type == "cuda":  # float16 runs natively on every CUDA GPU, bfloat16 from Ampere (8.0) on
        return dtype == torch.float16 or torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return (dtype == torch.bfloat16 and cpu_has_native_bf16()) or (dtype == torch.float16 and cpu_has_native_fp16())
    return True  # other backends: no way to tell, no warning


def reduced_precision_is_faster(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` convolutions are expected to beat float32 on ``device``: native, and on an
    x86 CPU also its matrix instructions (:data:`CPU_FAST_NEEDS`). oneDNN runs float16 on any CPU
    with AVX512-FP16, but without AMX-FP16 at float32 speed or below (torch 2.14.1, a Xeon with
    AVX512-FP16 and AMX-BF16 but no AMX-FP16: float16 convolutions 0.75-0.9x float32's throughput,
    bfloat16 3.5-4x), and bfloat16 on AVX-512 CPUs without AVX512-BF16 through float32. Where the
    flags are unknown (no /proc/cpuinfo flags), native counts as faster. On CUDA: bfloat16 from compute
    capability 8.0 (Ampere), float16 from 7.0 (Volta) and on the P100 (6.0), by the capability of
    ``device`` (``torch.cuda.is_bf16_supported()`` also counts emulation, and looks only at the current
    device)."""
    if not reduced_precision_is_native(device, dtype):
        return False
    if torch.device(device).type == "cuda":  # float16 tensor cores from Volta (7.0); the P100 (6.0) has
        capability = torch.cuda.get_device_capability(device)  # 2x-rate float16, other Pascal GPUs 1/64
        return dtype == torch.bfloat16 or capability >= (7, 0) or capability == (6, 0)
    flags = cpu_flags() if torch.device(device).type == "cpu" else frozenset()
    return not flags or bool(flags & _CPU_FAST_FLAGS[dtype])


def reduced_precision_support(device: torch.device | str, dtype: torch.dtype) -> str:
    """``"fast"``, ``"native (no faster than float32)"`` or ``"emulated"`` (see
    :func:`reduced_precision_is_faster` and :func:`reduced_precision_is_native`)."""
    if reduced_precision_is_faster(device, dtype):
        return "fast"
    return "native (no faster than float32)" if reduced_precision_is_native(device, dtype) else "emulated"


def autocast_to(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; for ``None``/float32/float64 a no-op that leaves
    an enclosing autocast (e.g. Lightning's mixed-precision training) in force."""
    if dtype is None or dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def cpu_description() -> str:
    """``model name`` from /proc/cpuinfo (or platform.processor()), torch's CPU capability level
    and how bfloat16 and float16 run (:func:`reduced_precision_support`), e.g. ``"AMD EPYC, AVX2,
    bfloat16 emulated, float16 emulated"``."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = "unknown"
    return (f"{name}, {capability}, bfloat16 {reduced_precision_support('cpu', torch.bfloat16)}, "
            f"float16 {reduced_precision_support('cpu', torch.float16)}")


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Ask glibc to keep freed memory in the process (``mallopt``): blocks up to ``mmap_threshold``
    bytes come from the heap, and the heap is only returned to the kernel beyond ``trim_threshold``
    bytes of free space. Repeated inference then stops page-faulting its activations back in on every
    call (measured on 2-core VMs: 34-74k faults per fast dkm_base match, about 0.4M and 0.4 s per
    faithful one, millions per DKMv3 match). Affects the whole process
    (its resident set stays at its peak): call it from a program's entry point, not from library code.

    ``mallopt`` takes C ``int`` values: both thresholds must be below 2 GiB.
    Returns whether the settings were applied (False where the C library is not glibc)."""
    import ctypes
    import ctypes.util

    if not 0 < mmap_threshold < 2**31 or not 0 < trim_threshold < 2**31:
        raise ValueError(f"thresholds must be in (0, 2**31) (C int), got {mmap_threshold} and {trim_threshold}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):
        return False
