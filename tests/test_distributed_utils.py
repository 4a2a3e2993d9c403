"""Sharding and record gathering on two CPU processes (gloo)."""
from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dkm.utils.distributed import gather_records, object_group, shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_covers_every_index_once():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            parts = [shard(range(n), r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 2 out of range for world size 2"):
        shard(range(3), 2, 2)


def test_gather_without_process_group_dedups_and_sorts():
    recs = [{"pair_index": 2, "v": "a"}, {"pair_index": 0, "v": "b"}, {"pair_index": 2, "v": "c"}]
    assert gather_records(recs) == [{"pair_index": 0, "v": "b"}, {"pair_index": 2, "v": "a"}]


def _worker(rank: int, world: int, port: int, n: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = shard(range(n), rank, world)
        # simulate padding as a DistributedSampler would do: the last rank repeats index 0
        if len(mine) < -(-n // world):
            mine = mine + [0]
        records = [{"pair_index": i, "rank": rank, "err": float(i)} for i in mine]
        merged = gather_records(records, group=object_group(60))
        out.put((rank, [(r["pair_index"], r["err"]) for r in merged]))
    finally:
        dist.destroy_process_group()


def test_gather_records_on_two_gloo_processes():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    n, world = 7, 2
    procs = [ctx.Process(target=_worker, args=(r, world, port, n, out))
             for port in [_free_port()] for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = [(i, float(i)) for i in range(n)]
    assert results[0] == expected and results[1] == expected
