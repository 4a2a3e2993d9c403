"""Deterministic synthetic weights from key names and shapes (the recipe of the parity fixtures).

Used by the parity tests and the speed benches: the official weights cannot be downloaded there.
"""
from __future__ import annotations

import hashlib
import math

import torch


def synthetic_tensor(name: str, shape, g: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    last = name.rsplit(".", 1)[-1]
    shape = tuple(shape)
    if last == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) * (gain / math.sqrt(fan_in))
    if len(shape) == 1:
        if last == "running_var":
            return 1 + 0.1 * torch.rand(shape, generator=g)
        if last in ("bias", "running_mean"):
            return 0.1 * torch.randn(shape, generator=g)
        if last == "weight":
            return 1 + 0.1 * torch.randn(shape, generator=g)
    raise ValueError(f"synthetic weights: no rule for {name} with shape {shape}")


def synthetic_state_dict(shapes, seed: int = 0, gain: float = 1.0) -> dict[str, torch.Tensor]:
    """``shapes``: mapping name -> shape (or a module's state_dict). Names are visited in sorted order
    with one CPU generator seeded once; returns a state_dict in the input's order."""
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in dict(shapes).items()}
    g = torch.Generator().manual_seed(seed)
    made = {name: synthetic_tensor(name, shapes[name], g, gain) for name in sorted(shapes)}
    return {k: made[k] for k in shapes}


def state_dict_digest(sd) -> str:
    """sha256 over sorted names, each followed by the tensor's raw little-endian bytes."""
    h = hashlib.sha256()
    for name in sorted(sd):
        h.update(name.encode("utf-8"))
        h.update(sd[name].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
