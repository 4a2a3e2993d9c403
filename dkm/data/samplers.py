"""Epoch-seeded weighted sampling that is identical on every rank and split across ranks."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class WeightedEpochSampler(Sampler):
    """Each epoch draws ``num_samples`` indices without replacement with probability proportional
    to ``weights`` (Gumbel-top-k, any size), seeded by ``(seed, epoch)`` so that every rank draws
    the same list; rank ``r`` of ``world_size`` takes ``list[r::world_size]`` (padded to equal length).

    Yields ``(index, epoch)`` keys: datasets use the epoch to seed their per-item augmentation.
    :meth:`resume` makes the next pass draw a given epoch from part-way through this rank's share
    (a training run resumed mid-epoch sees the rest of the epoch it was interrupted in).
    """

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.numel() == 0 or not (self.weights > 0).any():
            raise ValueError("WeightedEpochSampler: no item has positive weight")
        self.num_samples = min(int(num_samples), int((self.weights > 0).sum()))
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self._epoch_set, self._iterations = False, 0
        self._resume: tuple[int, int] | None = None  # (epoch, items of this rank's share to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; without it, successive passes count as epochs."""
        self.epoch, self._epoch_set = epoch, True

    def next_epoch(self) -> int:
        """The epoch the next pass draws (unless :meth:`resume` says otherwise)."""
        return self.epoch if self._epoch_set else self._iterations

    def resume(self, epoch: int, start: int = 0) -> None:
        """The next pass (only) draws ``epoch``, whatever :meth:`set_epoch` said, and skips the first
        ``start`` items of this rank's share of it (without reading them)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"WeightedEpochSampler.resume: start {start} outside [0, {len(self)}] (this rank's share)")
        self._resume = (int(epoch), int(start))

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self):
        epoch, start = self._resume if self._resume is not None else (self.next_epoch(), 0)
        self._iterations, self._resume = self._iterations + 1, None
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        u = torch.rand(self.weights.shape, generator=g, dtype=torch.float64).clamp_min(1e-300)
        keys = self.weights.log() - (-u.log()).log()
        idx = keys.topk(self.num_samples).indices.tolist()
        idx += idx[: len(self) * self.world_size - len(idx)]  # pad so every rank yields len(self)
        for i in idx[self.rank::self.world_size][start:]:
            yield (i, epoch)
