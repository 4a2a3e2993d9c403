"""The body of ``evaluate.py``: config -> benchmark + model -> metrics.json, pairs.csv, summary."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .benchmarks import BENCHMARKS
from .models.zoo import build_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_benchmark(cfg: Mapping, data_root=None, seed: int = 0, limit=None, check: bool = True):
    """A benchmark object from a ``conf/benchmark/*.yaml`` mapping (``name`` selects the class)."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    root = data_root if data_root is not None else cfg.pop("data_root")
    cfg.pop("data_root", None)
    return BENCHMARKS[name](root, seed=seed, limit=limit, check=check, **cfg)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def write_records_csv(records: list[dict], path) -> None:
    """One row per pair; list-valued fields (repeated estimates) joined with ``;``."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow({k: ";".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r[k])
                        if isinstance(r.get(k), (list, tuple)) else r.get(k, "") for k in keys})


def summary_table(name: str, metrics: dict) -> str:
    keys = [k for k in metrics if "@" in k] + [k for k in metrics if "@" not in k]
    head = " | ".join(f"{k:>10}" for k in keys)
    vals = " | ".join(f"{metrics[k]:>10.2f}" if isinstance(metrics[k], float) else f"{metrics[k]:>10}" for k in keys)
    return f"{name}\n{head}\n{vals}"


def evaluate_benchmark(cfg, out_dir) -> dict:
    """Run ``cfg.benchmark`` on ``cfg.model`` (+ ``cfg.ckpt``), write outputs into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    bench = build_benchmark(cfg.benchmark, cfg.data_root, seed=cfg.seed, limit=cfg.limit)  # fails early
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    ckpt_hash = None
    if cfg.ckpt is not None:
        model_cfg["weights"] = str(cfg.ckpt)
        ckpt_hash = sha256_file(cfg.ckpt)
    elif model_cfg.get("weights"):
        ckpt_hash = sha256_file(model_cfg["weights"])
    model = build_model(model_cfg)
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    if hasattr(model, "inference_dtype"):
        model.inference_dtype = DTYPES[cfg.dtype]
    log.info("evaluating %s on %s (%d pairs) on %s", model_cfg.get("arch"), bench.name, len(bench), device)
    metrics, records = bench.run(model, progress=cfg.progress)
    result = {
        "benchmark": bench.name,
        "metrics": metrics,
        "protocol": OmegaConf.to_container(cfg.benchmark, resolve=True),
        "model": model_cfg,
        "checkpoint": None if cfg.ckpt is None else str(cfg.ckpt),
        "checkpoint_sha256": ckpt_hash,
        "seed": cfg.seed,
        "device": str(device),
        "dtype": cfg.dtype,
        "limit": cfg.limit,
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    write_records_csv(records, out_dir / "pairs.csv")
    print(summary_table(f"{bench.name} ({len(records)} pairs, {metrics['num_failed']} failed)", metrics))
    print(f"metrics: {out_dir / 'metrics.json'}\nper pair: {out_dir / 'pairs.csv'}")
    return metrics
