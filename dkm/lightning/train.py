"""The body of ``train.py``: config -> DataModule, LightningModule, logger, callbacks, Trainer."""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from ..data.datamodules import DKMDataModule
from .callbacks import build_benchmark_callbacks
from .checkpoint_io import AtomicCheckpointIO
from .loggers import build_logger
from .module import DKMLightningModule

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


def training_steps(total_pairs: int, batch_size: int, world: int) -> int:
    """Steps that show ``total_pairs`` pairs at ``batch_size`` pairs per device on ``world`` devices
    (the recipe: ``32 * 250000 // (8 * gpus)``)."""
    return max(1, int(total_pairs) // (int(batch_size) * int(world)))


def build_trainer(cfg: DictConfig, out_dir: Path, extra_callbacks=()) -> tuple[pl.Trainer, ModelCheckpoint]:
    ck = OmegaConf.to_container(cfg.checkpoint, resolve=True)
    checkpoint = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True, **ck)
    logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), out_dir)
    callbacks = [checkpoint, *extra_callbacks]
    if logger is not None:  # (logger=none: LearningRateMonitor refuses a Trainer without a logger)
        callbacks.insert(1, LearningRateMonitor(logging_interval="step"))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_kwargs.get("max_steps") is None:
        if cfg.get("total_pairs") is None:
            raise ValueError("set trainer.max_steps or total_pairs (the LR milestones are fractions of the steps)")
        world = world_size(trainer_kwargs)
        trainer_kwargs["max_steps"] = training_steps(cfg.total_pairs, cfg.data.module.batch_size, world)
        log.info("trainer.max_steps = %d: total_pairs %d / (%d pairs per device x %d devices)",
                 trainer_kwargs["max_steps"], cfg.total_pairs, cfg.data.module.batch_size, world)
    trainer = pl.Trainer(default_root_dir=str(out_dir), logger=logger if logger is not None else False,
                         callbacks=callbacks, plugins=[AtomicCheckpointIO()], **trainer_kwargs)
    return trainer, checkpoint


def resume_path(out_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint to resume from: ``"hpc"`` (Lightning's name for the newest ``hpc_ckpt_<n>.ckpt`` in the
    run directory, written on a SLURM requeue signal) if the run directory holds one, whatever
    ``ckpt_path`` says (a requeued job re-runs its command line, whose ``ckpt_path`` is older), else
    ``ckpt_path``."""
    hpc = sorted(Path(out_dir).glob("hpc_ckpt_*.ckpt"))
    if hpc:
        log.info("resuming from the requeue checkpoint in %s (newest of %s)%s", out_dir, [p.name for p in hpc],
                 f", not ckpt_path={ckpt_path}" if ckpt_path else "")
        return "hpc"
    return ckpt_path


def train(cfg: DictConfig, out_dir) -> dict:
    """Fit (or resume with ``cfg.ckpt_path``); returns paths of what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    data = DKMDataModule(**OmegaConf.to_container(cfg.data.module, resolve=True), seed=cfg.seed)
    data.setup("fit")  # a missing or partial dataset tree fails here, before any training
    bench_callbacks = build_benchmark_callbacks(cfg.get("callbacks") or {}, seed=cfg.seed)  # checks data roots
    module = DKMLightningModule(OmegaConf.to_container(cfg.model, resolve=True),
                                OmegaConf.to_container(cfg.loss, resolve=True),
                                OmegaConf.to_container(cfg.optim, resolve=True),
                                log_images_every_n_steps=cfg.log_images_every_n_steps)
    trainer, checkpoint = build_trainer(cfg, out_dir, bench_callbacks)
    if trainer.logger is not None and hasattr(trainer.logger, "log_hyperparams"):
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=data, ckpt_path=resume_path(out_dir, cfg.ckpt_path))
    last = Path(checkpoint.dirpath) / "last.ckpt"
    return {"module": module, "trainer": trainer, "last_ckpt": last,
            "best_ckpt": checkpoint.best_model_path or None, "out_dir": out_dir}
