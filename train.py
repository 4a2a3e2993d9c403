"""Train DKM (the same program as the installed ``dkm-train``; body: :func:`dkm.cli.train_job`).

    python train.py model=dkm_base data=megadepth trainer.devices=4
    python train.py experiment=quickstart             # CPU, no dataset needed
    python train.py ... ckpt_path=outputs/train/<run>/checkpoints/last.ckpt   # resume

Writes into the run directory: config.yaml (the exact resolved config; Hydra's own copy is in
.hydra/), checkpoints/{last.ckpt, best}, the logger's files (W&B offline runs under wandb/).
"""
from dkm.cli import train

if __name__ == "__main__":
    train()
