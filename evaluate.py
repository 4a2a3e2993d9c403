"""Evaluate a matcher on a benchmark (the same program as the installed ``dkm-evaluate``; body:
:func:`dkm.cli.evaluate_job`).

    python evaluate.py benchmark=scannet ckpt=dkm_base_v11.pth data_root=/data/scannet
    python evaluate.py benchmark=hpatches model=sift limit=20

Writes into the run directory (``outputs/evaluate/<benchmark config>/<time>/``): ``metrics.json``
(metrics, the resolved protocol, the model config, the checkpoint's sha256), ``pairs.csv`` (one row per
pair), ``records.json`` (the per-pair records, for ``merge=``), ``evaluate.log`` and
``.hydra/config.yaml`` (the exact config). Each process journals its records as the pairs finish
(``records.rank<k>.jsonl``): after an interruption, ``resume=<that run dir>`` evaluates only the rest.
"""
from dkm.cli import evaluate

if __name__ == "__main__":
    evaluate()
