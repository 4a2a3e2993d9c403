"""``python -m dkm.lightning.export run/checkpoints/last.ckpt dkm_trained.pth``

Lightning ``.ckpt`` -> the upstream DKM ``.pth`` layout (the model's state_dict with the ``model.``
prefix stripped), loadable by ``dkm_base(weights=...)`` / ``dkm_small(weights=...)`` and by
``evaluate.py ckpt=...``.
"""
from __future__ import annotations

import argparse
import logging

from .checkpoint_io import export_weights

__all__ = ["export_weights", "main"]

log = logging.getLogger(__name__)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dkm.lightning.export",
                                description="Export a Lightning checkpoint to the upstream DKM .pth layout.")
    p.add_argument("ckpt", help="Lightning checkpoint (.ckpt) written by train.py")
    p.add_argument("out", help="output .pth (a plain state_dict)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    weights = export_weights(a.ckpt, a.out)
    log.info("wrote %d tensors (%.1fM values) to %s", len(weights),
             sum(v.numel() for v in weights.values()) / 1e6, a.out)


if __name__ == "__main__":
    main()
