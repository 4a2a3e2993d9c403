"""Benchmarks as validation loops under CPU DDP (gloo, 2 processes) vs one device, via train.py."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic_benchmarks import make_hpatches

REPO = Path(__file__).resolve().parents[1]


def run_train(out: Path, data_root: Path, devices: int, tmp: Path) -> subprocess.CompletedProcess:
    args = [
        sys.executable, str(REPO / "train.py"), "experiment=quickstart", "final_eval=null", "logger=csv",
        "model.h=64", "model.w=96", "trainer.max_steps=2", "trainer.max_time=null", "trainer.enable_progress_bar=false",
        "data.module.batch_size=2", "data.module.samples_per_epoch=8", "log_images_every_n_steps=0",
        "checkpoint.every_n_train_steps=2", "callbacks=[hpatches]", f"callbacks.hpatches.data_root={data_root}",
        "callbacks.hpatches.at_start=true", "callbacks.hpatches.every_n_steps=2", "callbacks.hpatches.num_log_pairs=1",
        "callbacks.hpatches.benchmark.num_samples=2000", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", f"hydra.run.dir={out}",
    ]
    return subprocess.run(args, cwd=tmp, capture_output=True, text=True, timeout=900)


def read_eval(out: Path, step: int):
    d = out / "benchmarks" / "hpatches" / f"step{step:08d}"
    metrics = json.loads((d / "metrics.json").read_text())
    rows = list(csv.DictReader(open(d / "pairs.csv")))
    return metrics, rows


def test_benchmark_callback_same_metrics_on_one_and_two_ranks(tmp_path):
    root = make_hpatches(tmp_path / "hp", seqs=("v_ddp",), hw=(120, 160), seed=7)  # 5 pairs: odd
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"run{devices}"
        res = run_train(out, root, devices, tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        results[devices] = out
    m1, rows1 = read_eval(results[1], 0)
    m2, rows2 = read_eval(results[2], 0)
    assert m2["num_ranks"] == 2 and m1["num_ranks"] == 1
    # before training both runs hold the same weights: every pair once, identical metrics
    assert [r["pair_index"] for r in rows2] == ["0", "1", "2", "3", "4"]
    assert m1["metrics"] == m2["metrics"] and m1["metrics"]["num_pairs"] == 5
    assert [r["corner_error"] for r in rows1] == [r["corner_error"] for r in rows2]
    # the in-training evaluation ran too, on all pairs, and its metrics reached the logger
    m2_step2, rows = read_eval(results[2], 2)
    assert m2_step2["metrics"]["num_pairs"] == 5 and len(rows) == 5
    # logged exactly when evaluated (steps 0 and 2), although the quickstart logs every 10 steps
    logged = list(csv.DictReader(open(results[2] / "csv" / "metrics.csv")))
    steps = [int(r["step"]) for r in logged if r.get("hpatches/auc@5")]
    assert steps == [0, 2], steps
    assert (results[2] / "checkpoints" / "last.ckpt").exists()
