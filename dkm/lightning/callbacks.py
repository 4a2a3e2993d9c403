"""Benchmarks as validation loops, sharded over ranks (the same benchmark objects as evaluate.py)."""
from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

from ..benchmarks.base import PairBenchmark
from ..evaluation import build_benchmark
from ..utils.distributed import gather_records, object_group, shard
from .module import log_warp_image

log = logging.getLogger(__name__)


class BenchmarkCallback(pl.Callback):
    """Runs ``benchmark`` every ``every_n_steps`` training steps and/or ``every_n_epochs`` epochs.

    Each rank evaluates ``indices[rank::world_size]`` (every rank works, none idles), the per-pair
    records are gathered over a gloo group with its own long timeout, de-duplicated by pair index
    (so every pair counts once whatever the world size) and reduced identically on every rank. The
    metrics are logged as ``<name>/<metric>`` from every rank with the same value, so
    ``ModelCheckpoint(monitor="hpatches/auc@5")`` works on all ranks; the logger writes once.

    Args:
        name: metric prefix.
        benchmark: a :class:`~dkm.benchmarks.base.PairBenchmark` (its data root is checked when built).
        indices: a fixed subset of pair indices (default: all pairs).
        num_log_pairs: rank 0 logs warp images of this many pairs per evaluation.
        timeout_s: timeout of the gathering collective.
    """

    def __init__(self, name: str, benchmark: PairBenchmark, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, at_start: bool = False, indices=None, num_log_pairs: int = 2,
                 timeout_s: float = 6 * 3600):
        if not every_n_steps and not every_n_epochs and not at_start:
            raise ValueError(f"benchmark callback {name}: set every_n_steps, every_n_epochs or at_start")
        self.name, self.benchmark = name, benchmark
        self.every_n_steps, self.every_n_epochs, self.at_start = every_n_steps, every_n_epochs, at_start
        self.indices = list(range(len(benchmark))) if indices is None else list(indices)
        self.num_log_pairs, self.timeout_s = num_log_pairs, timeout_s
        self.last_metrics: dict = {}
        self.last_records: list[dict] = []
        self.monitor: str | None = None  # the checkpoint's monitor, if it is one of this callback's metrics
        self._last_step: int | None = None  # (with gradient accumulation a step spans several batches)

    def setup(self, trainer, pl_module, stage):
        self.benchmark.check_model(pl_module.model)  # before training, not at the first evaluation
        object_group(self.timeout_s)  # collective: create the gathering group on every rank up front

    def on_train_start(self, trainer, pl_module):
        if self.at_start:  # Lightning allows no step-level self.log() here
            self.run(trainer, pl_module, log_to_module=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        # Lightning also calls this when training stops inside an epoch (max_steps, max_time, a requeue
        # signal): that is no epoch's end, and the benchmark would run off its schedule (in a requeue's grace time)
        progress = trainer.fit_loop.epoch_loop.batch_progress  # (as Lightning decides an epoch is over)
        if not (progress.is_last_batch or progress.current.ready == trainer.num_training_batches):
            return
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module, at_epoch_end=True)

    @torch.no_grad()
    def run(self, trainer, pl_module, log_to_module: bool = True, at_epoch_end: bool = False) -> dict:
        model = pl_module.model
        rank, world = trainer.global_rank, trainer.world_size
        mine = shard(self.indices, rank, world)
        records = self.benchmark.evaluate_pairs(model, mine, progress=rank == 0)
        records = gather_records(records, group=object_group(self.timeout_s) if world > 1 else None)
        metrics = self.benchmark.compute_metrics(records)
        self.last_metrics, self.last_records = metrics, records
        if self.monitor and self.monitor.removeprefix(self.name + "/") not in metrics:
            raise ValueError(f"checkpoint.monitor={self.monitor}: {self.name} reports "
                             f"{sorted(self.name + '/' + k for k in metrics)}")
        for k, v in metrics.items() if log_to_module else ():  # for callbacks (ModelCheckpoint's monitor)
            pl_module.log(f"{self.name}/{k}", float(v), on_step=not at_epoch_end, on_epoch=at_epoch_end,
                          sync_dist=False, batch_size=1, logger=False)
        if rank == 0:
            if trainer.logger is not None:  # straight to the logger, at this step (self.log
                # would reach it only on trainer.log_every_n_steps boundaries, and repeat it there later)
                trainer.logger.log_metrics({f"{self.name}/{k}": float(v) for k, v in metrics.items()},
                                           step=trainer.global_step)
            self._write(trainer, metrics, records)
            log.info("%s at step %d: %s", self.name, trainer.global_step,
                     ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            self._log_pairs(trainer, model)
        return metrics

    def _write(self, trainer, metrics: dict, records: list[dict]) -> None:
        """``<run dir>/benchmarks/<name>/step<k>/{metrics.json, pairs.csv}``."""
        import json
        from pathlib import Path

        from ..evaluation import write_records_csv
        from ..utils.files import atomic_write_text

        d = Path(trainer.default_root_dir) / "benchmarks" / self.name / f"step{trainer.global_step:08d}"
        d.mkdir(parents=True, exist_ok=True)
        write_records_csv(records, d / "pairs.csv")
        atomic_write_text(d / "metrics.json", json.dumps({"step": trainer.global_step, "metrics": metrics,
                                                          "num_ranks": trainer.world_size}, indent=2))

    def _log_pairs(self, trainer, model) -> None:
        if not self.num_log_pairs or not hasattr(model, "match") or trainer.logger is None:
            return
        from ..utils.image import pil_to_tensor
        from ..viz import warp_panel

        for i in self.indices[: self.num_log_pairs]:
            try:
                im1, im2 = self.benchmark.pair_images(self.benchmark.pairs()[i])
                with self.benchmark.model_settings_applied(model):  # the benchmark's resolution, upsampling, ...
                    warp, cert = model.match(im1, im2)
                    symmetric = getattr(model, "symmetric", False)  # (dense benchmarks turn it off)
                warp, cert = warp.cpu(), cert.cpu()  # (the images below are made on the CPU)
                if symmetric:  # DKMv3: columns :W hold A -> B, columns W: hold B -> A
                    warp, cert = warp[:, : warp.shape[1] // 2], cert[:, : cert.shape[1] // 2]
                h, w = warp.shape[:2]
                img = warp_panel(pil_to_tensor(im1.convert("RGB"), (h, w)), pil_to_tensor(im2.convert("RGB"), (h, w)),
                                 warp[..., 2:], cert)
                log_warp_image(trainer.logger, f"{self.name}/pair_{i}", img, trainer.global_step,
                               self.benchmark.pair_id(self.benchmark.pairs()[i]))
            except Exception as e:  # a picture is never worth a crash
                log.warning("%s: could not log pair %d: %s", self.name, i, e)


def build_benchmark_callbacks(cfg: dict, seed: int = 0) -> list[BenchmarkCallback]:
    """``cfg``: ``{name: {benchmark: <conf/benchmark mapping>, every_n_steps, every_n_epochs,
    limit, indices, num_log_pairs, data_root}}``. Builds (and so checks) every benchmark now."""
    out = []
    for name, c in dict(cfg).items():
        c = dict(c)
        bench = build_benchmark(dict(c.pop("benchmark")), c.pop("data_root", None), seed=seed, limit=c.pop("limit", None))
        out.append(BenchmarkCallback(name, bench, **c))
    return out
