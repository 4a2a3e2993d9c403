"""What the current machine can do fast (used to warn about, and to benchmark, reduced precision)."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions natively on this CPU (AVX512-BF16 or AMX). Without
    them bfloat16 is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # not exposed by this torch build: assume not
        return False


def reduced_precision_is_native(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` (bfloat16/float16) convolutions run natively on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return dtype == torch.bfloat16 and cpu_has_native_bf16()
    return True  # other backends: no way to tell, no warning


def cpu_description() -> str:
    """``model name`` from /proc/cpuinfo (or platform.processor()), torch's CPU capability level
    and whether bfloat16 is native, e.g. ``"AMD EPYC, AVX2, bfloat16 emulated"``."""
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
    return f"{name}, {capability}, bfloat16 {'native' if cpu_has_native_bf16() else 'emulated'}"
