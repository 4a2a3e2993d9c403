"""Sharding work over ranks and gathering per-item records (plain ``torch.distributed``).

Used by benchmarks run as validation loops: each rank evaluates ``indices[rank::world_size]``,
the per-pair records of all ranks are gathered, de-duplicated by their index and sorted, so every
pair counts exactly once whatever the number of ranks.
"""
from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from contextlib import contextmanager

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's disjoint share: ``indices[rank::world_size]`` (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return list(indices)[rank::world_size]


def launched_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` that a launcher (``torchrun``) put in the environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); ``(0, 1, 0)`` for a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


@contextmanager
def launched_group(timeout_s: float):
    """The default process group (gloo: only Python objects are exchanged) of the processes a
    launcher started, set up from its environment and torn down on exit; nothing for a plain
    process or when a group exists already. ``timeout_s`` bounds every collective, e.g. the wait of
    the first rank done for the slowest."""
    rank, world, _ = launched_ranks()
    if world == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", timeout=_dt.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


_GROUPS: dict[float, object] = {}


def object_group(timeout_s: float = 6 * 3600.0):
    """A gloo process group for gathering Python objects, with its own (long) timeout, so that a
    long evaluation on one rank does not trip the training collectives' timeout and the objects
    never touch an accelerator. Must be called on all ranks (collectively) the first time."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if timeout_s not in _GROUPS:
        _GROUPS[timeout_s] = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout_s))
    return _GROUPS[timeout_s]


def gather_records(records: list[dict], key: str = "pair_index", group=None) -> list[dict]:
    """All ranks' ``records`` (on every rank), de-duplicated by ``record[key]`` (first kept) and
    sorted by it. Without a process group this just de-duplicates and sorts the local records."""
    rank, world = rank_and_world()
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, list(records), group=group)
        records = [r for part in gathered for r in part]
    unique: dict = {}
    for r in records:
        unique.setdefault(r[key], r)
    return [unique[k] for k in sorted(unique)]
