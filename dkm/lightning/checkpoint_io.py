"""Checkpoint writing that never leaves a truncated file, and export to the upstream .pth layout."""
from __future__ import annotations

import logging

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ..utils.files import atomic_write

log = logging.getLogger(__name__)


def atomic_save(obj, path) -> None:
    """``torch.save`` into a temporary file next to ``path``, fsync, then rename over ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O writing through :func:`atomic_save`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_save(checkpoint, path)


def export_weights(ckpt_path, out_path) -> dict:
    """Lightning ``.ckpt`` -> the upstream ``.pth`` layout (the model's state_dict, keys without the
    ``model.`` prefix), loadable by ``dkm_base(weights=...)`` and ``evaluate.py ckpt=...``."""
    from ..models.zoo import read_checkpoint

    ckpt = read_checkpoint(ckpt_path)  # (train.py's checkpoints need no pickle)
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{ckpt_path}: not a Lightning checkpoint (expected a dict with a 'state_dict', "
                         f"got {type(ckpt).__name__}{' without one' if isinstance(ckpt, dict) else ''})")
    # contiguous: a model trained with channels_last stores NHWC-strided weights; the .pth has the release's layout
    weights = {k[len("model."):]: v.contiguous() for k, v in sd.items() if k.startswith("model.")}
    if not weights:
        raise ValueError(f"{ckpt_path}: no 'model.*' weights in its state_dict")
    atomic_save(weights, out_path)
    return weights


if __name__ == "__main__":  # kept for old command lines; the CLI is dkm.lightning.export
    from .export import main

    main()
