"""Experiment loggers from config; W&B falls back to offline mode by itself when it cannot log in."""
from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_can_go_online(host: str = "api.wandb.ai", timeout: float = 2.0) -> tuple[bool, str]:
    """``(ok, reason)``: an API key is configured and the W&B host is reachable."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return False, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not has_key and netrc.exists():
        has_key = host in netrc.read_text(errors="ignore")
    if not has_key:
        return False, "no W&B login (no WANDB_API_KEY or ~/.netrc entry)"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return False, f"{host} unreachable ({e.__class__.__name__})"
    return True, ""


def build_logger(cfg: dict, save_dir: Path):
    """``cfg.kind``: ``wandb`` (default), ``csv``, ``tensorboard`` or ``none``; the other keys go to the
    logger (W&B: ``project``, ``name``, ``offline``, ``id``: see ``conf/logger/wandb.yaml``)."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    cfg = dict(cfg)
    kind = cfg.pop("kind", "wandb")
    if kind == "none":
        return None
    if kind == "csv":  # csv/version_<k>/metrics.csv, one per start: a resumed run does not replace the earlier one's
        return CSVLogger(save_dir=str(save_dir), name="csv")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=str(save_dir), name="tensorboard", version="")
    if kind != "wandb":
        raise ValueError(f"unknown logger kind {kind!r} (wandb, csv, tensorboard, none)")
    offline = bool(cfg.pop("offline", False))
    if not offline:
        ok, reason = wandb_can_go_online()
        if not ok:
            offline = True
            log.warning("W&B: logging offline (%s); sync later with `wandb sync %s/wandb/offline-run-*`",
                        reason, save_dir)
    if cfg.get("id") is None and os.environ.get("SLURM_JOB_ID"):
        cfg["id"] = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{cfg.get('name') or 'dkm'}-{os.environ['SLURM_JOB_ID']}")
    if cfg.get("id") is not None:  # WandbLogger passes resume="allow": continues the W&B run of that id if it exists
        log.info("W&B run id %s", cfg["id"])
    return WandbLogger(save_dir=str(save_dir), offline=offline, **cfg)
