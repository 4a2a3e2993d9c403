"""``python -m dkm.lightning.export run/checkpoints/last.ckpt dkm_trained.pth``

Lightning ``.ckpt`` -> the upstream DKM ``.pth`` layout (the model's state_dict with the ``model.``
prefix stripped), loadable by ``dkm_base(weights=...)`` / ``dkm_small(weights=...)`` and by
``evaluate.py ckpt=...``. A ``.pth`` holds weights only, so the command also logs the architecture
and resolution the model was trained with (stored in the ``.ckpt``) and the call that rebuilds it.
"""
from __future__ import annotations

import argparse
import logging

from ..models.zoo import checkpoint_model_config
from .checkpoint_io import export_weights

__all__ = ["export_weights", "load_hint", "main"]

log = logging.getLogger(__name__)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dkm.lightning.export",
                                description="Export a Lightning checkpoint to the upstream DKM .pth layout.")
    p.add_argument("ckpt", help="Lightning checkpoint (.ckpt) written by train.py")
    p.add_argument("out", help="output .pth (a plain state_dict)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights = export_weights(a.ckpt, a.out)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    log.info("wrote %d tensors (%.1fM values) to %s", len(weights),
             sum(v.numel() for v in weights.values()) / 1e6, a.out)
    cfg = checkpoint_model_config(a.ckpt)
    if cfg is not None:
        log.info(load_hint(cfg, a.out))


def load_hint(model_cfg: dict, out: str) -> str:
    """How to rebuild the exported model: a ``.pth`` holds weights only, not the architecture's settings
    or the resolution it was trained at (``model_cfg``: ``checkpoint_model_config`` of the ``.ckpt``)."""
    call = ", ".join(f"{k!r}: {v!r}" for k, v in {**model_cfg, "weights": str(out)}.items())
    return (f"{out} holds the weights only; the model was trained as {model_cfg['arch']} at "
            f"{model_cfg.get('h')}x{model_cfg.get('w')}: rebuild it with dkm.build_model({{{call}}}), "
            f"or use the .ckpt itself (evaluate.py ckpt=..., python -m dkm.demo --weights ...), "
            f"which carries this config")


if __name__ == "__main__":
    main()
