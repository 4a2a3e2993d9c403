"""Train DKM.

    python train.py model=dkm_base data=megadepth trainer.devices=4
    python train.py experiment=quickstart             # CPU, no dataset needed
    python train.py ... ckpt_path=outputs/train/<run>/checkpoints/last.ckpt   # resume

Writes into the run directory: config.yaml (the exact resolved config; Hydra's own copy is in
.hydra/), checkpoints/{last.ckpt, best}, the logger's files (W&B offline runs under wandb/).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("train")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dkm.lightning.train import train

    out_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    untrained = None
    if cfg.get("final_eval"):
        from dkm.models.zoo import build_model
        import torch

        torch.manual_seed(cfg.seed)
        untrained = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    result = train(cfg, out_dir)
    trainer = result["trainer"]
    if trainer.global_rank != 0:
        return
    if type(trainer.logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()  # flush now, so that the report below stays the last output
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
        from dkm.quickstart import report_line, run_quickstart_eval

        trained = copy.deepcopy(result["module"].model).cpu().eval()
        results = run_quickstart_eval(trained, untrained.eval(), out_dir,
                                      OmegaConf.to_container(cfg.final_eval, resolve=True))
        print(f"metrics: {out_dir / 'quickstart_metrics.json'}")
        print(report_line(results))


if __name__ == "__main__":
    main()
