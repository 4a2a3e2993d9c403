"""SLURM preemption and time limits: a signal-safe requeue checkpoint, and its clean-up after resuming.

Lightning's own SLURM handler writes its checkpoint from inside the signal handler, i.e. wherever the
main thread happens to be: on several GPUs its barrier can meet another rank's gradient all-reduce
(a hang until the NCCL timeout), and on any device the checkpoint can catch an optimiser step half
done. :class:`RequeueOnSignal` only notes the signal; after the next optimiser step every rank
agrees (one all-reduce of a flag), all write ``hpc_ckpt_<n>.ckpt`` together, rank 0 requeues the job
(``scontrol requeue``) and training stops. The requeued job resumes from that file
(:func:`dkm.lightning.train.resume_path`) and :class:`PruneRequeueCheckpoints` deletes older ones.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)


def requeue_checkpoints(out_dir: Path) -> list[Path]:
    """The ``hpc_ckpt_<n>.ckpt`` files in ``out_dir`` (Lightning's name for requeue checkpoints; it
    resumes ``ckpt_path="hpc"`` from the largest ``n``), oldest (smallest ``n``) first."""
    found = [(p.stem.rsplit("_", 1)[-1], p) for p in Path(out_dir).glob("hpc_ckpt_*.ckpt")]
    return [p for _, p in sorted((int(n), p) for n, p in found if n.isdigit())]


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this job (``<array job>_<task>`` in a job array)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class RequeueOnSignal(pl.Callback):
    """On ``signum`` (SLURM: ``#SBATCH --signal=SIGUSR1@90``, sent to every task, or to any of them):
    after the optimiser step under way, every rank saves ``hpc_ckpt_<n+1>.ckpt`` in the run directory
    at once, rank 0 runs ``scontrol requeue <job id>`` and training stops. The signal handler itself
    only sets a flag; the ranks compare flags after every optimiser step (one all-reduce of a bool)."""

    def __init__(self, signum: int | str = "SIGUSR1"):
        self.signum = signal.Signals[signum] if isinstance(signum, str) else signal.Signals(signum)
        self.received = False
        self._previous = None
        self._last_step: int | None = None

    def _on_signal(self, signum, frame) -> None:
        self.received = True  # nothing else here: the checkpoint is written between steps, by every rank

    def setup(self, trainer, pl_module, stage) -> None:
        if stage == "fit":
            try:
                self._previous = signal.signal(self.signum, self._on_signal)
            except ValueError:  # only the main thread may install handlers
                log.warning("training runs outside the main thread: %s will not checkpoint and requeue the job",
                            self.signum.name)
                return
            log.info("%s: a requeue checkpoint after the current step, then scontrol requeue %s",
                     self.signum.name, slurm_job_id())

    def teardown(self, trainer, pl_module, stage) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # mid-accumulation: no optimiser step yet
            return
        self._last_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):  # any rank signalled
            return
        existing = requeue_checkpoints(Path(trainer.default_root_dir))
        n = int(existing[-1].stem.rsplit("_", 1)[-1]) + 1 if existing else 1
        path = Path(trainer.default_root_dir) / f"hpc_ckpt_{n}.ckpt"
        log.info("%s received: saving %s at step %d", self.signum.name, path, trainer.global_step)
        trainer.save_checkpoint(path)  # every rank (rank 0 writes, atomically), then a barrier
        if trainer.is_global_zero:
            job = slurm_job_id()
            try:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True) if job else None
            except FileNotFoundError:
                done = None
            if done is not None and done.returncode == 0:
                log.info("requeued SLURM job %s", job)
            else:
                log.error("could not requeue SLURM job %s (%s); resubmit it: it resumes from %s", job,
                          done.stderr.strip() if done is not None else "no scontrol or no SLURM_JOB_ID", path)
        trainer.should_stop = True


class PruneRequeueCheckpoints(pl.Callback):
    """Once a requeued job has resumed from the newest ``hpc_ckpt_<n>.ckpt`` (Lightning restores it
    before training starts), deletes the older ones: each holds the weights and the optimiser state,
    and a job requeued every day would otherwise keep one per requeue."""

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        for old in requeue_checkpoints(Path(trainer.default_root_dir))[:-1]:
            log.info("removing %s: the job resumed from a newer requeue checkpoint", old)
            old.unlink(missing_ok=True)
