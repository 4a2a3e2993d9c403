"""Evaluate a matcher on a benchmark.

    python evaluate.py benchmark=scannet ckpt=dkm_base_v11.pth data_root=/data/scannet
    python evaluate.py benchmark=hpatches model=sift limit=20

Writes into the run directory (``outputs/evaluate/<benchmark config>/<time>/``): ``metrics.json``
(metrics, the resolved protocol, the model config, the checkpoint's sha256), ``pairs.csv`` (one row per
pair), ``records.json`` (the per-pair records, for ``merge=``), ``evaluate.log`` and
``.hydra/config.yaml`` (the exact config). Each process journals its records as the pairs finish
(``records.rank<k>.jsonl``): after an interruption, ``resume=<that run dir>`` evaluates only the rest.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dkm.evaluation import evaluate_benchmark
from dkm.utils.device import keep_freed_memory
from dkm.utils.distributed import launched_ranks, tag_log_records

log = logging.getLogger("evaluate")


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    hydra_cfg = hydra.core.hydra_config.HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.get("resume") is True and not any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
                                             for o in hydra_cfg.overrides.hydra):
        log.warning("resume=true continues this run's own directory, but no hydra.run.dir= was given: this run "
                    "has a new one (%s), with nothing to resume; give hydra.run.dir=<the run's directory>", out_dir)
    if launched_ranks()[0] > 0:
        tag_log_records(launched_ranks()[0])
    if cfg.keep_freed_memory:
        log.info("glibc keeps freed memory (no page faults per match): %s", keep_freed_memory())
    metrics = evaluate_benchmark(cfg, out_dir)
    return metrics


if __name__ == "__main__":
    main()
