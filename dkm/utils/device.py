"""What the current machine can do fast (used to warn about, and to benchmark, reduced precision)."""
from __future__ import annotations

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
    slower than float32."""
    return _onednn_check("_is_mkldnn_bf16_supported")


@functools.lru_cache(maxsize=None)
def cpu_has_native_fp16() -> bool:
    """Whether oneDNN runs float16 convolutions on this CPU: torch's check, AVX512-FP16 (e.g. Intel
    Xeon since Sapphire Rapids) or AVX-NE-CONVERT. Elsewhere PyTorch's generic kernels run them, many
    times slower than float32."""
    return _onednn_check("_is_mkldnn_fp16_supported")


#: what a CPU needs for native reduced-precision convolutions (named in warnings)
CPU_NATIVE_NEEDS = {torch.bfloat16: "AVX512-BF16 or AMX", torch.float16: "AVX512-FP16 or AVX-NE-CONVERT"}


def reduced_precision_is_native(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` (bfloat16/float16) convolutions run natively on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return (dtype == torch.bfloat16 and cpu_has_native_bf16()) or (dtype == torch.float16 and cpu_has_native_fp16())
    return True  # other backends: no way to tell, no warning


def autocast_to(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op for ``None``/float32/float64."""
    device = torch.device(device)
    enabled = dtype is not None and dtype not in (torch.float32, torch.float64)
    return torch.autocast(device.type, dtype=dtype if enabled else None, enabled=enabled)


def cpu_description() -> str:
    """``model name`` from /proc/cpuinfo (or platform.processor()), torch's CPU capability level
    and whether bfloat16 and float16 are native, e.g. ``"AMD EPYC, AVX2, bfloat16 emulated, float16
    emulated"``."""
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
    native = {True: "native", False: "emulated"}
    return (f"{name}, {capability}, bfloat16 {native[cpu_has_native_bf16()]}, "
            f"float16 {native[cpu_has_native_fp16()]}")


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
