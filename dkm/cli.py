"""The command-line programs, Hydra applications on the configs of :func:`dkm.evaluation.config_dir`:

    dkm-train model=dkm_base data=megadepth trainer.devices=4      # = python train.py ... in a checkout
    dkm-evaluate benchmark=scannet ckpt=dkm_base_v11.pth data_root=data/scannet   # = python evaluate.py ...

``pip install`` puts ``dkm-train`` and ``dkm-evaluate`` on the PATH; they find the configs a wheel installs
as ``dkm/conf`` (a checkout's ``conf/`` in an editable install), so they run without a checkout. Run
directories are relative to the working directory (``outputs/train/...``, ``outputs/evaluate/...``).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .evaluation import config_dir

log = logging.getLogger(__name__)


def _run_dir() -> Path:
    return Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)


def train_job(cfg: DictConfig) -> None:
    """One training run in the Hydra run directory: config.yaml (the resolved config; Hydra's own copy
    is in .hydra/), checkpoints/{last.ckpt, best}, the logger's files (W&B offline runs under wandb/);
    with ``final_eval`` (the quickstart) the held-out evaluation of the trained model against the
    untrained one, "no warp" and SIFT, whose summary is the last line printed."""
    from .lightning.train import train

    out_dir = _run_dir()
    untrained = None
    if cfg.get("final_eval"):
        import torch

        from .models.zoo import build_model

        torch.manual_seed(cfg.seed)
        untrained = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    result = train(cfg, out_dir)
    trainer = result["trainer"]
    if trainer.global_rank != 0:
        return
    if type(trainer.logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()  # flush now, so that the report below stays the last output
    # the report is the program's output (stdout), not a log record
    print(f"checkpoint: {result['last_ckpt']}")
    if result["best_ckpt"]:
        best = Path(result["best_ckpt"])
        earlier = "" if best.resolve().is_relative_to(out_dir.resolve()) else " (written by the run this one resumed)"
        print(f"best checkpoint: {best}{earlier}")
    wandb_dir = out_dir / "wandb"
    if wandb_dir.exists():
        print(f"W&B run files: {wandb_dir} (offline runs: `wandb sync {wandb_dir}/offline-run-*`)")
    losses = [float(v) for v in result["module"].loss_history]
    if len(losses) >= 20:
        k = max(10, len(losses) // 10)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"training loss: mean of the first {k} steps {first:.4f} -> last {k} steps {last:.4f} "
              f"({100 * (last - first) / first:+.1f}%, {len(losses)} steps)")
    if cfg.get("final_eval"):
        from .quickstart import report_line, run_quickstart_eval

        trained = copy.deepcopy(result["module"].model).cpu().eval()
        results = run_quickstart_eval(trained, untrained.eval(), out_dir,
                                      OmegaConf.to_container(cfg.final_eval, resolve=True))
        print(f"metrics: {out_dir / 'quickstart_metrics.json'}")
        print(report_line(results))


def evaluate_job(cfg: DictConfig) -> dict:
    """One evaluation in the Hydra run directory (see :func:`dkm.evaluation.evaluate_benchmark`):
    metrics.json, pairs.csv, records.json, the per-process journals records.rank<k>.jsonl."""
    from .evaluation import evaluate_benchmark
    from .utils.device import keep_freed_memory
    from .utils.distributed import launched_ranks, tag_log_records

    hydra_cfg = hydra.core.hydra_config.HydraConfig.get()
    out_dir = _run_dir()
    if cfg.get("resume") is True and not any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
                                             for o in hydra_cfg.overrides.hydra):
        log.warning("resume=true continues this run's own directory, but no hydra.run.dir= was given: this run "
                    "has a new one (%s), with nothing to resume; give hydra.run.dir=<the run's directory>", out_dir)
    if launched_ranks()[0] > 0:
        tag_log_records(launched_ranks()[0])
    if cfg.keep_freed_memory:
        log.info("glibc keeps freed memory (no page faults per match): %s", keep_freed_memory())
    return evaluate_benchmark(cfg, out_dir)


_CONF = str(config_dir())
#: ``dkm-train`` / ``python train.py``
train = hydra.main(config_path=_CONF, config_name="train", version_base="1.3")(train_job)
#: ``dkm-evaluate`` / ``python evaluate.py``
evaluate = hydra.main(config_path=_CONF, config_name="evaluate", version_base="1.3")(evaluate_job)
