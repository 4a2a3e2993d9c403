"""Sharding work over ranks and gathering per-item records (plain ``torch.distributed``).

Used by benchmarks run as validation loops: each rank evaluates ``indices[rank::world_size]``,
the per-pair records of all ranks are gathered, de-duplicated by their index and sorted, so every
pair counts exactly once whatever the number of ranks.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence

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
    """``(rank, world_size, local_rank)`` of a process ``torchrun`` started (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, recognised by its ``TORCHELASTIC_RUN_ID``: a ``WORLD_SIZE`` left in the environment
    by something else, e.g. a DDP training job's, does not count); ``(0, 1, 0)`` otherwise."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return 0, 1, 0
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def slurm_step_tasks() -> int:
    """How many tasks the SLURM job step this process belongs to has (``srun --ntasks``); 1 outside one."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", 1))


def launched_group(setup_timeout_s: float = 1800.0):
    """The default process group (gloo: only Python objects are exchanged) of the processes
    ``torchrun`` started, created from its environment on the first call and kept for the life of
    the process (a Hydra multirun evaluates its jobs in one process); ``None`` for a plain process.
    ``setup_timeout_s`` bounds its creation and barriers; long waits go through :func:`object_group`."""
    _, world, _ = launched_ranks()
    if world == 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_dt.timedelta(seconds=setup_timeout_s))
    return dist.group.WORLD


def tag_log_records(rank: int) -> None:
    """Prefix ``[rank <rank>]`` to every message the root logger's handlers emit (the processes of a
    torchrun job share one console and, with one run directory, one log file)."""

    class _RankTag(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not getattr(record, "rank_tagged", False):  # (one record passes every handler)
                record.msg, record.rank_tagged = f"[rank {rank}] {record.msg}", True
            return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(_RankTag())


def all_ranks(obj, group=None) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


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
