"""Training under CPU DDP (gloo, 2 processes) via train.py: benchmarks as validation loops vs one
device, and a run resumed mid-epoch vs an uninterrupted one."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from synthetic_benchmarks import make_hpatches

REPO = Path(__file__).resolve().parents[1]


def train_args(out: Path, data_root: Path, devices: int) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"), "experiment=quickstart", "final_eval=null", "logger=csv",
        "model.h=64", "model.w=96", "trainer.max_steps=2", "trainer.max_time=null", "trainer.enable_progress_bar=false",
        "data.module.batch_size=2", "data.module.samples_per_epoch=8", "log_images_every_n_steps=0",
        "checkpoint.every_n_train_steps=2", "callbacks=[hpatches]", f"callbacks.hpatches.data_root={data_root}",
        "callbacks.hpatches.at_start=true", "callbacks.hpatches.every_n_steps=2", "callbacks.hpatches.num_log_pairs=1",
        "callbacks.hpatches.benchmark.num_samples=2000", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        f"trainer.strategy={'ddp' if devices > 1 else 'auto'}", f"hydra.run.dir={out}",
    ]


def run_side_by_side(runs: list[list[str]], cwd: Path, timeout: float = 900) -> list[str]:
    """Runs the commands at the same time (independent runs: each process spends its first seconds
    importing, on one core) and returns their output (stdout and stderr); fails naming the command
    that failed. Output goes to files, so that no process blocks on a full pipe while another is awaited."""
    procs = []
    for args in runs:
        log = tempfile.TemporaryFile("w+")
        procs.append((subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True), log))
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    finally:
        for p, _ in procs:  # (after a timeout: none left running)
            p.kill()
    logs = []
    for (p, log), args in zip(procs, runs):
        log.seek(0)
        logs.append(log.read())
        log.close()
        assert p.returncode == 0, f"{' '.join(args[1:])}\n{logs[-1][-3000:]}"
    return logs


def read_eval(out: Path, step: int):
    d = out / "benchmarks" / "hpatches" / f"step{step:08d}"
    metrics = json.loads((d / "metrics.json").read_text())
    rows = list(csv.DictReader(open(d / "pairs.csv")))
    return metrics, rows


def test_benchmark_callback_same_metrics_on_one_and_two_ranks(tmp_path):
    root = make_hpatches(tmp_path / "hp", seqs=("v_ddp",), hw=(120, 160), seed=7)  # 5 pairs: odd
    results = {devices: tmp_path / f"run{devices}" for devices in (1, 2)}
    run_side_by_side([train_args(out, root, devices) for devices, out in results.items()], tmp_path)
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
    logged = list(csv.DictReader(open(results[2] / "csv" / "version_0" / "metrics.csv")))
    steps = [int(r["step"]) for r in logged if r.get("hpatches/auc@5")]
    assert steps == [0, 2], steps
    assert (results[2] / "checkpoints" / "last.ckpt").exists()


def test_ddp_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """Two ranks, epochs of 4 steps: 6 steps at once vs 3 steps (ended between two periodic saves),
    then resumed to 6 (across the epoch boundary, no periodic save). Training is deterministic on CPU, so equal weights mean the resumed run trained on the
    same batches on every rank, with the same optimiser state. The legs stop by trainer.max_steps, so the
    LR milestones (fractions of it) are put beyond every leg: a constant LR in all three."""
    import torch

    def args(out, steps, every, ckpt=None):
        return [sys.executable, str(REPO / "train.py"), "experiment=quickstart", "final_eval=null", "logger=csv",
                "model.h=64", "model.w=96", f"trainer.max_steps={steps}", "trainer.max_time=null",
                "trainer.enable_progress_bar=false", "data.module.batch_size=2", "data.module.samples_per_epoch=16",
                "log_images_every_n_steps=0", f"checkpoint.every_n_train_steps={every}", "checkpoint.monitor=null",
                "optim.milestones=[2.0,3.0]", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                f"hydra.run.dir={out}"] + ([f"ckpt_path={ckpt}"] if ckpt is not None else [])

    def last(out):
        return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    # the uninterrupted run and the first leg (saves at step 2; last.ckpt at step 3 is written when
    # training ends) are independent: side by side
    logs = run_side_by_side([args(tmp_path / "whole", 6, 6), args(tmp_path / "first", 3, 2)], tmp_path)
    whole, first = last(tmp_path / "whole"), last(tmp_path / "first")
    assert first["global_step"] == 3 and first["loops"]["fit_loop"]["state_dict"]["combined_loader"] == \
        [{"epoch": 0, "batches": 3}]
    logs += run_side_by_side([args(tmp_path / "resumed", 6, 100, ckpt=tmp_path / "first" / "checkpoints" / "last.ckpt")],
                             tmp_path)
    assert not any("not resumable" in log for log in logs)
    resumed = last(tmp_path / "resumed")
    assert whole["global_step"] == resumed["global_step"] == 6
    assert resumed["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    moved = max((whole["state_dict"][k] - first["state_dict"][k]).abs().max() for k in whole["state_dict"])
    assert moved > 1e-4  # the last 3 steps changed the weights
    for k, v in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=0, atol=0, msg=k)


def test_a_slurm_requeue_signal_to_one_rank_stops_both_after_the_same_step(tmp_path):
    """Two ranks launched as srun launches them (SLURM_* variables, no Lightning launcher); SIGUSR1
    reaches rank 1 only. Both ranks stop after the same optimiser step, one hpc_ckpt_1.ckpt holds that
    step (written between steps, not inside the handler), rank 0 runs `scontrol requeue <job id>`
    once, and both exit cleanly (no collective left waiting)."""
    import os
    import signal
    import socket
    import time

    import torch

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "train.py"), "experiment=quickstart", "final_eval=null", "logger=none",
            "model.h=64", "model.w=96", "trainer.max_steps=400", "trainer.max_time=null",
            "trainer.enable_progress_bar=false", "data.module.batch_size=2", "data.module.samples_per_epoch=16",
            "log_images_every_n_steps=0", "checkpoint.every_n_train_steps=1000", "checkpoint.monitor=null",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={out}"]
    procs = []
    for rank in (0, 1):
        env = os.environ | {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "2",
                            "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                            "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        procs.append(subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))

    def catches_sigusr1(pid: int) -> bool:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1)
        return False

    deadline = time.monotonic() + 300
    while not catches_sigusr1(procs[1].pid):  # (before the handler is installed SIGUSR1 would kill it)
        assert procs[1].poll() is None and time.monotonic() < deadline, procs[1].communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(3)  # well into training
    procs[1].send_signal(signal.SIGUSR1)
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert [p.name for p in out.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    step = torch.load(out / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step < 400
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == step
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
