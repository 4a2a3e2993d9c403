"""The body of ``train.py``: config -> DataModule, LightningModule, logger, callbacks, Trainer."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from ..data.datamodules import DKMDataModule
from ..utils.files import atomic_write_text
from ..utils.versions import software_versions
from .callbacks import build_benchmark_callbacks
from .checkpoint_io import AtomicCheckpointIO
from .loggers import build_logger
from .module import DKMLightningModule
from .requeue import PruneRequeueCheckpoints, RequeueOnSignal, requeue_checkpoints

log = logging.getLogger(__name__)


def world_size(trainer_kwargs: dict) -> int:
    """The number of training processes Lightning will run for these ``Trainer`` arguments
    (accelerator, devices, num_nodes, strategy; also under SLURM/torchrun), without starting them."""
    keys = ("accelerator", "devices", "num_nodes", "strategy")
    quiet = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the real Trainer prints the device summary
        q.setLevel(logging.WARNING)
    try:
        probe = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False, **{k: trainer_kwargs[k] for k in keys if k in trainer_kwargs})
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return probe.world_size


def training_steps(total_pairs: int, batch_size: int, world: int, accumulate: int = 1) -> int:
    """Optimiser steps that show ``total_pairs`` pairs at ``batch_size`` pairs per device and batch on
    ``world`` devices, ``accumulate`` batches per step (the recipe: ``32 * 250000 // (8 * gpus)``)."""
    return max(1, int(total_pairs) // (int(batch_size) * int(world) * int(accumulate)))


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` only (no top-k), every ``every_n_train_steps`` steps and when training ends after
    its newest save (``max_steps`` or ``max_time`` between two saves; another checkpoint written at the
    final step, e.g. a best-k one, does not count): Lightning's ``save_last`` at the end covers only a
    run that saved none. Overwrites ``last.ckpt`` also when resuming a checkpoint whose callback state
    it does not match (no ``last-v1.ckpt``)."""

    def __init__(self, dirpath: Path, every_n_train_steps: int | None, mode: str = "max"):
        super().__init__(dirpath=str(dirpath), every_n_train_steps=every_n_train_steps, save_top_k=0,
                         save_last=True, mode=mode, enable_version_counter=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_global_step_saved != trainer.global_step:  # (Lightning's bookkeeping of this callback)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # every rank; rank 0 writes


class BestCheckpoint(ModelCheckpoint):
    """The best-k checkpoints ranked by ``monitor``; a ``train/<metric>`` that the first training step
    did not log fails right after that step, naming the logged ones (Lightning would fail only at the
    first save, ``every_n_train_steps`` later)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._checked = False  # whether the monitored train/<metric> was looked for yet

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor.startswith("train/") and trainer.global_step >= 1 and not self._checked:
            self._checked = True
            if self.monitor not in trainer.callback_metrics:
                logged = sorted(k for k in trainer.callback_metrics if k.startswith("train/"))
                raise ValueError(f"checkpoint.monitor={self.monitor}: the training step logs no such metric; "
                                 f"it logs {logged}")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def build_checkpoints(ck: dict, dirpath: Path, benchmarks=()) -> tuple[LastCheckpoint, ModelCheckpoint | None]:
    """The checkpoint callbacks ``(last, best or None)`` for ``cfg.checkpoint`` (``every_n_train_steps``, ``monitor``, ``mode``,
    ``save_top_k``; further keys go to the best-k callback): ``last.ckpt`` every ``every_n_train_steps``
    steps and at the end of training, and with a ``monitor`` the ``save_top_k`` best checkpoints, saved
    right after each evaluation that produces the monitored value (a benchmark callback's
    ``<name>/<metric>``, or a ``train/...`` metric every ``every_n_train_steps``) so that none is ranked
    by an older evaluation's score. A monitor naming no configured callback fails here, before training."""
    ck = dict(ck)
    every, monitor = ck.pop("every_n_train_steps", None), ck.pop("monitor", None)
    mode, top_k = ck.pop("mode", "max"), ck.pop("save_top_k", 1)
    last = LastCheckpoint(dirpath, every, mode)
    if not monitor:
        return last, None
    by_name = {b.name: b for b in benchmarks}
    prefix = monitor.split("/", 1)[0]
    if prefix == "train":
        when = {"every_n_train_steps": every}
    elif prefix in by_name:
        bench = by_name[prefix]
        bench.monitor = monitor  # checked against its metrics at its first evaluation
        if bench.every_n_steps:
            when = {"every_n_train_steps": bench.every_n_steps}
        elif bench.every_n_epochs:
            when = {"every_n_epochs": bench.every_n_epochs}
        else:
            raise ValueError(f"checkpoint.monitor={monitor}: callback {prefix} runs only at start; "
                             f"set callbacks.{prefix}.every_n_steps")
    else:
        raise ValueError(f"checkpoint.monitor={monitor}: no such metric source; expected train/<metric> or "
                         f"<callback>/<metric> with a callback of {sorted(by_name) or 'none (callbacks=[...])'}")
    return last, BestCheckpoint(dirpath=str(dirpath), monitor=monitor, mode=mode, save_top_k=top_k,
                                filename="best-{step}", auto_insert_metric_name=False, **when, **ck)


def build_trainer(cfg: DictConfig, out_dir: Path, extra_callbacks=()) -> tuple[pl.Trainer, ModelCheckpoint | None]:
    """The Trainer and the best-k ModelCheckpoint (None without ``checkpoint.monitor``)."""
    ck = OmegaConf.to_container(cfg.checkpoint, resolve=True)
    benchmarks = [c for c in extra_callbacks if hasattr(c, "benchmark")]
    last, best = build_checkpoints(ck, out_dir / "checkpoints", benchmarks)
    logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), out_dir)
    # best before last: at a step where both save, last.ckpt then holds the best-k state that includes
    # that step's best checkpoint (the other order leaves it out, and a run resumed from last.ckpt forgets it)
    callbacks = [c for c in (best, last) if c is not None] + [PruneRequeueCheckpoints(), *extra_callbacks]
    if logger is not None:  # (logger=none: LearningRateMonitor refuses a Trainer without a logger)
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kwargs.get("max_steps") is None:
        if cfg.get("total_pairs") is None:
            raise ValueError("set trainer.max_steps or total_pairs (the LR milestones are fractions of the steps)")
        world, accumulate = world_size(trainer_kwargs), int(trainer_kwargs.get("accumulate_grad_batches") or 1)
        trainer_kwargs["max_steps"] = training_steps(cfg.total_pairs, cfg.data.module.batch_size, world, accumulate)
        log.info("trainer.max_steps = %d: total_pairs %d / (%d pairs per device x %d devices x %d batches per step)",
                 trainer_kwargs["max_steps"], cfg.total_pairs, cfg.data.module.batch_size, world, accumulate)
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect() and cfg.get("requeue_signal"):  # our signal-safe requeue, not Lightning's
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(RequeueOnSignal(cfg.requeue_signal))
    trainer = pl.Trainer(default_root_dir=str(out_dir), logger=logger if logger is not None else False,
                         callbacks=callbacks, plugins=plugins, **trainer_kwargs)
    return trainer, best


def resume_path(out_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint to resume from: ``"hpc"`` (Lightning's name for the newest ``hpc_ckpt_<n>.ckpt`` in the
    run directory, written on a SLURM requeue signal) if the run directory holds one, whatever
    ``ckpt_path`` says (a requeued job re-runs its command line, whose ``ckpt_path`` is older), else
    ``ckpt_path``."""
    hpc = requeue_checkpoints(out_dir)
    if hpc:
        log.info("resuming from the requeue checkpoint in %s (newest of %s)%s", out_dir, [p.name for p in hpc],
                 f", not ckpt_path={ckpt_path}" if ckpt_path else "")
        return "hpc"
    return ckpt_path


def record_versions(path: Path, earlier: list | None = None) -> tuple[dict, list[dict]]:
    """The software versions of this start of training, appended to the list in ``path`` (one entry
    per start with other versions than the last: a run resumed after an upgrade keeps both). A new run
    directory starts from ``earlier``, the list the resumed checkpoint carries. Returns this start's
    versions and the whole list."""
    versions = software_versions()
    history = json.loads(path.read_text()) if path.exists() else list(earlier or [])
    if not history or history[-1] != versions:
        history = [*history, versions]
        atomic_write_text(path, json.dumps(history, indent=2))
    return versions, history


def resumed_checkpoint(ckpt_path) -> dict | None:
    """The ``train.py`` checkpoint ``ckpt_path`` names (memory-mapped), or ``None`` without one; a file
    that is not one (an official or exported ``.pth``: weights only) is refused before training, with
    the option that starts from weights instead."""
    if ckpt_path is None or ckpt_path == "hpc":
        return None
    from ..models.zoo import read_checkpoint

    state = read_checkpoint(ckpt_path)  # (names a missing or unreadable file)
    if not (isinstance(state, dict) and "pytorch-lightning_version" in state and "state_dict" in state):
        raise ValueError(f"ckpt_path={ckpt_path} is not a checkpoint of train.py (it holds no training state: "
                         "step, optimiser, data position); ckpt_path= resumes a run. To start training from "
                         f"weights (an official or exported .pth), give model.weights={ckpt_path}")
    return state


def check_requeue_signal(name) -> None:
    """``requeue_signal``: ``null`` or a signal name such as ``SIGUSR1`` (checked in every job, not only
    under SLURM, where a wrong name would surface at the first requeue)."""
    import signal

    if name is not None and name not in signal.Signals.__members__:
        raise ValueError(f"requeue_signal={name!r}: expected null or a signal name, e.g. SIGUSR1 "
                         "(as in #SBATCH --signal=SIGUSR1@90)")


def train(cfg: DictConfig, out_dir) -> dict:
    """Fit (or resume with ``cfg.ckpt_path``); returns paths of what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    check_requeue_signal(cfg.get("requeue_signal"))
    ckpt_path = resume_path(out_dir, cfg.ckpt_path)
    resumed = resumed_checkpoint(ckpt_path)
    versions, history = {}, []
    if rank_zero_only.rank == 0:  # (every rank runs this under srun or torchrun)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        versions, history = record_versions(out_dir / "versions.json",
                                            earlier=(resumed or {}).get("dkm_software_versions"))
    del resumed
    data = DKMDataModule(**OmegaConf.to_container(cfg.data.module, resolve=True), seed=cfg.seed)
    data.setup("fit")  # a missing or partial dataset tree fails here, before any training
    bench_callbacks = build_benchmark_callbacks(cfg.get("callbacks") or {}, seed=cfg.seed)  # checks data roots
    module = DKMLightningModule(OmegaConf.to_container(cfg.model, resolve=True),
                                OmegaConf.to_container(cfg.loss, resolve=True),
                                OmegaConf.to_container(cfg.optim, resolve=True),
                                log_images_every_n_steps=cfg.log_images_every_n_steps,
                                channels_last=cfg.channels_last)
    module.software_versions = history  # (saved in its checkpoints: a resume elsewhere keeps the history)
    trainer, best = build_trainer(cfg, out_dir, bench_callbacks)
    if trainer.logger is not None and hasattr(trainer.logger, "log_hyperparams"):
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True) | {"versions": versions})
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return {"module": module, "trainer": trainer, "last_ckpt": out_dir / "checkpoints" / "last.ckpt",
            "best_ckpt": (best.best_model_path or None) if best is not None else None, "out_dir": out_dir}
