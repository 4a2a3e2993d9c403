"""Held-out evaluation of the embedded quickstart: the trained model against three baselines on the
same HPatches-protocol pairs (held-out scikit-image photographs under random homographies)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .benchmarks import HpatchesHomogBenchmark
from .data.homography import skimage_images, write_hpatches_tree
from .geometry.coords import normalized_grid
from .models.sift import SiftMatcher

log = logging.getLogger(__name__)


class NoWarpMatcher:
    """The "no warp" guess: every pixel matches the same normalized position in the other image."""

    def match_sparse(self, im1, im2):
        g = normalized_grid(48, 64).reshape(-1, 2).numpy().astype(np.float64)
        return np.concatenate([g, g], axis=1), np.ones(len(g))


def heldout_benchmark(root, images=("coffee", "chelsea", "rocket"), hw=(480, 640), seed=0, protocol=None):
    """Write the held-out pairs as an HPatches tree under ``root`` and return the benchmark."""
    tree = write_hpatches_tree(skimage_images(images), images, root, hw=hw, seed=seed)
    return HpatchesHomogBenchmark(tree, seed=seed, **(protocol or {}))


def compare(bench: HpatchesHomogBenchmark, matchers: dict, out_dir) -> dict:
    """Evaluate each matcher; write ``quickstart_metrics.json``; return ``{name: metrics}``."""
    results = {}
    for name, m in matchers.items():
        log.info("held-out evaluation: %s", name)
        results[name] = bench.run(m, progress=False)[0]
    Path(out_dir, "quickstart_metrics.json").write_text(json.dumps(results, indent=2))
    return results


def report_line(results: dict) -> str:
    """One line: AUC@3/5/10 and median corner error per matcher."""
    parts = [f"{n}: AUC@3/5/10 {r['auc@3']:.1f}/{r['auc@5']:.1f}/{r['auc@10']:.1f}, median error "
             f"{r['median_corner_error']:.1f}px" for n, r in results.items()]
    n = next(iter(results.values()))["num_pairs"]
    return f"held-out ({n} pairs, HPatches protocol) | " + " | ".join(parts)


def run_quickstart_eval(trained, untrained, out_dir, cfg: dict) -> dict:
    bench = heldout_benchmark(Path(out_dir) / "heldout", images=tuple(cfg.get("images", ("coffee", "chelsea", "rocket"))),
                              hw=tuple(cfg.get("hw", (480, 640))), seed=cfg.get("seed", 0),
                              protocol=cfg.get("protocol"))
    return compare(bench, {"trained": trained, "untrained": untrained, "no-warp": NoWarpMatcher(),
                           "SIFT": SiftMatcher()}, out_dir)
