"""The body of ``evaluate.py``: config -> benchmark + model -> metrics.json, pairs.csv, summary."""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .benchmarks import BENCHMARKS, dedup_records
from .benchmarks.saved_matches import (MATCHING_KEYS, SavedMatches, copy_saved_matches, remove_saved_matches,
                                       save_matches)
from .evaluation_journal import RecordJournal, canonical, differences, journal_path, journals_in, lookup, read_journals
from .models.matcher import PRECISION_SCOPES
from .models.zoo import build_model
from .utils.distributed import all_ranks, gather_records, launched_group, launched_ranks, object_group, slurm_step_tasks
from .utils.distributed import shard as shard_indices
from .utils.files import atomic_write_text, fsync_dir
from .utils.versions import software_versions

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_dir() -> Path:
    """The Hydra configs: ``conf/`` of a source checkout (also an editable install), or the copy a
    wheel installs as ``dkm/conf``."""
    here = Path(__file__).resolve().parent
    for d in (here.parent / "conf", here / "conf"):
        if (d / "evaluate.yaml").is_file():
            return d
    raise FileNotFoundError(f"no Hydra configs next to {here} (expected {here.parent / 'conf'} in a checkout, "
                            f"{here / 'conf'} in an installed wheel): reinstall dkm")


def benchmark_config(name: str) -> dict:
    """The protocol ``conf/benchmark/<name>.yaml`` as a dict, e.g. ``benchmark_config("scannet_dkmv3")``."""
    path = config_dir() / "benchmark" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(f.stem for f in path.parent.glob("*.yaml"))
        raise ValueError(f"no benchmark config {name!r} ({path}); expected one of {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def build_benchmark(cfg: Mapping | str, data_root=None, seed: int = 0, limit=None, check: bool = True,
                    index: bool = True):
    """A benchmark object from a ``conf/benchmark/*.yaml`` mapping (``name`` selects the class) or the
    name of one of those files (``build_benchmark("scannet_dkmv3", "data/scannet")``);
    ``index=False``: the protocol only, no dataset read (to reduce records evaluated elsewhere)."""
    cfg = dict(benchmark_config(cfg) if isinstance(cfg, str) else cfg)
    name = cfg.pop("name")
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
    root = data_root if data_root is not None else cfg.pop("data_root")
    cfg.pop("data_root", None)
    return BENCHMARKS[name](root, seed=seed, limit=limit, check=check, index=index, **cfg)


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA if available, else CPU. Under torchrun (``local_rank`` given) CUDA means this
    process's GPU, ``cuda:<local_rank>``, made the current device; an explicit index is refused (every
    process would use that GPU), and so is a local rank without a GPU of its own."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if local_rank is not None and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device={device} under torchrun: every process would use that GPU; give device=cuda "
                             "(process k of a node takes cuda:k) and choose the GPUs with CUDA_VISIBLE_DEVICES")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} but {torch.cuda.device_count()} visible GPUs: start at most "
                             "that many processes per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def write_records_csv(records: list[dict], path) -> None:
    """One row per pair; list-valued fields (repeated estimates) joined with ``;``."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in records:
        w.writerow({k: ";".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r[k])
                    if isinstance(r.get(k), (list, tuple)) else r.get(k, "") for k in keys})
    atomic_write_text(path, f.getvalue())


def summary_table(name: str, metrics: dict) -> str:
    """A two-line table (metric names over values), ``@`` metrics first."""
    keys = [k for k in metrics if "@" in k] + [k for k in metrics if "@" not in k]
    cells = [f"{metrics[k]:.2f}" if isinstance(metrics[k], float) else str(metrics[k]) for k in keys]
    widths = [max(len(k), len(c), 8) for k, c in zip(keys, cells)]
    head = " | ".join(k.rjust(w) for k, w in zip(keys, widths))
    vals = " | ".join(c.rjust(w) for c, w in zip(cells, widths))
    return f"{name}\n{head}\n{vals}"


def select_indices(n: int, subset=None, shard=None) -> list[int]:
    """The pair indices to evaluate: ``subset`` (explicit indices, or ``"a:b"`` a range) of all
    ``n``, then ``shard = "k/m"`` keeps every m-th from the k-th (as the distributed callbacks do)."""
    if subset is None:
        idx = list(range(n))
    elif isinstance(subset, str):
        try:
            a, b = (int(v) if v else None for v in subset.split(":"))
        except ValueError:
            raise ValueError(f"subset={subset!r}: expected a list of indices or 'start:stop'") from None
        idx = list(range(n))[a:b]
    else:
        idx = [int(i) for i in subset]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"subset: indices {bad[:10]} out of range [0, {n})")
    if shard is not None:
        try:
            k, m = (int(v) for v in str(shard).split("/"))
            idx = shard_indices(idx, k, m)
        except ValueError as e:
            raise ValueError(f"shard={shard!r}: expected 'k/m' with 0 <= k < m ({e})") from None
    idx = list(dict.fromkeys(idx))  # a pair named twice is evaluated once
    if not idx:  # (else the run would build the model, evaluate nothing and fail in the metrics)
        sel = ", ".join(f"{k}={v!r}" for k, v in (("subset", subset), ("shard", shard)) if v is not None)
        raise ValueError(f"{sel} selects none of the {n} pairs" + (" (more shards than pairs)" if shard else ""))
    return idx


def _read_json(path: Path, what: str = "merge"):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e}); re-run that evaluation") from e


def load_records(run_dirs, what: str = "merge") -> list[dict]:
    """Records of earlier runs (their ``records.json``), de-duplicated by ``pair_index``; ``what``
    (the option reading them) begins the errors."""
    records = []
    for d in run_dirs:
        f = Path(d) / "records.json"
        if not f.exists():
            raise FileNotFoundError(f"{what}: {f} not found (written by every finished evaluate.py run)")
        records += _read_json(f, what)
    return dedup_records(records)


def load_run_metadata(run_dirs: list, what: str = "merge") -> dict:
    """What the runs (``metrics.json`` of each) agree on: the benchmark's pair count, model config,
    checkpoint and its sha256. Runs of other checkpoints or protocols are refused."""
    metas = []
    for d in run_dirs:
        f = Path(d) / "metrics.json"
        if not f.exists():
            raise FileNotFoundError(f"{what}: {f} not found (written by every finished evaluate.py run)")
        metas.append(_read_json(f, what))
    for m in metas:
        m["protocol"] = comparable_protocol(m.get("protocol"))
    idents = [identity_of(m.get("benchmark"), m.get("protocol"), m.get("seed"), m.get("model") or {},
                          m.get("checkpoint_sha256"), m.get("dtype", "float32"), m.get("precision_scope", "refiners"))
              | {"num_pairs_in_benchmark": m.get("num_pairs_in_benchmark")} for m in metas]
    for d, ident in zip(run_dirs[1:], idents[1:]):
        differ = list(differences(canonical(idents[0]), canonical(ident)))
        if differ:
            first = [lookup(idents[0], k) for k in differ]
            raise ValueError(f"{what}: the runs differ in {differ} ({run_dirs[0]}: {first}; {d}: "
                             f"{[lookup(ident, k) for k in differ]}); give runs of one model, one benchmark protocol "
                             "and one seed only")
    out = {key: metas[0].get(key) for key in ("benchmark", "num_pairs_in_benchmark", "model", "checkpoint",
                                               "checkpoint_sha256", "dtype", "precision_scope", "protocol", "seed")}
    out["dataset_warnings"] = sorted({w for m in metas for w in m.get("dataset_warnings") or []})
    sources = sorted({d for m in metas for d in m.get("matches_from") or []})
    out["matches_from"] = sources or None
    for key in ("limit", "subset"):  # the selection the runs share (shards of one limited run), else None
        values = {json.dumps(m.get(key)) for m in metas}
        out[key] = json.loads(values.pop()) if len(values) == 1 else None
    out["versions"] = [json.loads(v) for v in sorted({json.dumps(m.get("versions"), sort_keys=True) for m in metas})]
    return out


def comparable_protocol(protocol: Mapping | None) -> dict | None:
    """A run's protocol without what may differ between the shards of one evaluation (the data root,
    e.g. on other machines) or is derived from the model (the effective resolutions)."""
    if protocol is None:
        return None
    return {k: v for k, v in dict(protocol).items()
            if k not in ("data_root", "effective_resolution", "effective_upsample_res")}


def model_config_for(cfg_model: dict, ckpt) -> dict:
    """``cfg_model`` with ``weights=ckpt``; for a Lightning ``.ckpt`` of ``train.py`` the architecture
    and resolution it was trained with (stored in it) replace the command line's."""
    from .models.zoo import checkpoint_model_config

    stored = checkpoint_model_config(ckpt) or {}
    changed = {k: v for k, v in stored.items() if cfg_model.get(k) != v}
    if changed:
        log.info("%s carries the model config it was trained with; using it: %s", ckpt, changed)
    return dict(cfg_model) | stored | {"weights": str(ckpt), "pretrained": False, "backbone_weights": None}


def evaluate_benchmark(cfg, out_dir) -> dict:
    """Run ``cfg.benchmark`` on ``cfg.model`` (+ ``cfg.ckpt``), write outputs into ``out_dir``:
    ``metrics.json`` (metrics, resolved protocol, checkpoint sha256), ``pairs.csv`` (one row per
    pair), ``records.json`` (the same records, loss-free, for ``merge=``) and print a summary table.
    With ``merge=[run dirs]`` no model runs and no dataset is read: the records of those runs (e.g.
    shards) are merged and reduced by the protocol (their model and checkpoint are recorded).

    Started by ``torchrun --nproc-per-node=N``, the N processes split the pairs (``pairs[rank::N]``,
    each on its own GPU), gather their records (over gloo) and rank 0 writes the outputs: the same
    records and metrics as one process.

    Every process journals its records as they are made (``records.rank<k>.jsonl``, see
    :mod:`dkm.evaluation_journal`); ``resume=<run dir>`` evaluates only the pairs that run's journals
    do not hold, and writes the outputs of the whole selection."""
    rank, world, local_rank = launched_ranks()
    if cfg.get("merge") and cfg.get("resume"):
        raise ValueError("merge= and resume= together: merge= scores finished runs (their records.json), resume= "
                         "continues an interrupted one (its records.rank*.jsonl); give one of them")
    if cfg.get("merge") and cfg.get("matches_from"):
        raise ValueError("merge= and matches_from= together: merge= scores finished runs' records as they are, "
                         "matches_from= estimates again from their saved matches; give one of them")
    if world > 1 and cfg.get("merge"):
        raise ValueError("merge= runs no model: run it as one process (python evaluate.py merge=...), not under torchrun")
    if world == 1 and slurm_step_tasks() > 1 and cfg.get("shard") is None and not cfg.get("merge"):
        raise ValueError(f"this srun step has {slurm_step_tasks()} tasks, each of which would evaluate every pair "
                         "into the same run directory: start one task per node running torchrun (see README, "
                         "Evaluating), or give each task its share, shard=$SLURM_PROCID/$SLURM_NTASKS with its "
                         "own hydra.run.dir, and merge= the shards")
    launched_group()  # torchrun: the processes' group (created once per process)
    gather_group = object_group(float(cfg.gather_timeout_s)) if world > 1 else None  # (None for one process)
    metrics = _evaluate_benchmark(cfg, out_dir, rank, world, local_rank, gather_group)
    if world > 1:  # all leave together (rank 0 has written): a multirun's next job starts on all ranks at once
        torch.distributed.barrier(group=gather_group)
    return metrics


def _evaluate_benchmark(cfg, out_dir, rank: int, world: int, local_rank: int, gather_group) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    merging = bool(cfg.get("merge"))
    if merging:
        refuse_interrupted_run(out_dir)  # (its metrics.json would make the journals look finished)
    limit, subset = selection(cfg)
    bench = build_benchmark(cfg.benchmark, cfg.data_root, seed=cfg.seed, limit=limit,
                            index=not merging)  # a missing or incomplete dataset fails here, early
    if merging:
        records, run = merged_records(cfg, bench, limit, subset)
    else:
        records, run = evaluated_records(cfg, bench, out_dir, rank, world, local_rank, gather_group, subset)
    metrics = bench.compute_metrics(records)
    if rank > 0:  # rank 0 writes the outputs
        return metrics
    protocol = OmegaConf.to_container(cfg.benchmark, resolve=True)
    result = {
        "benchmark": bench.name,
        "metrics": metrics,
        "protocol": protocol | {"data_root": None if merging else str(bench.data_root),
                                "effective_resolution": run.get("effective_resolution"),
                                "effective_upsample_res": run.get("effective_upsample_res")},
        "model": run["model"],
        "checkpoint": run["checkpoint"],
        "checkpoint_sha256": run["checkpoint_sha256"],
        "seed": cfg.seed,
        "device": run.get("device"),
        "num_ranks": world,
        "devices": run.get("devices"),
        "model_settings": run.get("model_settings"),
        "dtype": run.get("dtype", cfg.dtype),  # (merge=: the runs')
        "precision_scope": run.get("precision_scope", cfg.get("precision_scope", "refiners")),
        "limit": limit,
        "dataset_warnings": run["dataset_warnings"],
        "subset": subset,
        "shard": cfg.get("shard"),
        "merged_from": [str(d) for d in cfg.merge] if merging else None,
        "matches_from": run.get("matches_from"),
        "num_pairs_in_benchmark": run["num_pairs_in_benchmark"],
        "missing_pairs": run.get("missing_pairs", []),
        "resumed": run.get("resumed"),
        "versions": run["versions"],
    }
    # each file whole or not at all; metrics.json last, so that its presence means a complete run
    atomic_write_text(out_dir / "records.json", json.dumps(records, default=_json_default))
    write_records_csv(records, out_dir / "pairs.csv")
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2, default=str))
    print(summary_table(f"{bench.name} ({len(records)} pairs, {metrics['num_failed']} failed)", metrics))
    print(f"metrics: {out_dir / 'metrics.json'}\nper pair: {out_dir / 'pairs.csv'}")
    return metrics


def selection(cfg) -> tuple[int | None, list | str | None]:
    """``(limit, subset)`` of this run: the command's; for ``merge=`` and ``matches_from=`` without its
    own, the one the runs it reads share (the shards of a ``limit=100`` run merge as that run)."""
    subset = OmegaConf.to_container(cfg.subset) if OmegaConf.is_config(cfg.get("subset")) else cfg.get("subset")
    limit, sources = cfg.limit, cfg.get("merge") or cfg.get("matches_from")
    if not sources or (limit is not None and subset is not None):
        return limit, subset
    what = "merge" if cfg.get("merge") else "matches_from"
    dirs = [str(sources)] if isinstance(sources, (str, Path)) else [str(d) for d in sources]
    meta = load_run_metadata(dirs, what=what)
    inherited = (meta["limit"] if limit is None else limit, meta["subset"] if subset is None else subset)
    if inherited != (limit, subset):
        log.info("%s: the runs selected limit=%s, subset=%s; so does this one", what, *inherited)
    return inherited


def merged_records(cfg, bench, limit, subset) -> tuple[list[dict], dict]:
    """``merge=``: the selected pairs' records of the runs named, and what those runs' ``metrics.json``
    agree on (model, checkpoint, pair count, dataset warnings; ``missing_pairs`` with ``merge_partial``)."""
    meta = load_run_metadata(list(cfg.merge))
    if meta["benchmark"] not in (None, bench.name):
        raise ValueError(f"merge: the runs are of benchmark {meta['benchmark']!r}, not {bench.name!r}")
    given = comparable_protocol(OmegaConf.to_container(cfg.benchmark, resolve=True))
    differ = [] if meta["protocol"] is None else list(differences(canonical(given), canonical(meta["protocol"])))
    if differ:
        raise ValueError(f"merge: the runs were evaluated with another protocol than benchmark={bench.name} "
                         f"gives here (differs in {differ}); merge with the runs' benchmark config")
    if meta["seed"] is not None and meta["seed"] != cfg.seed:
        raise ValueError(f"merge: the runs used seed={meta['seed']}, this command seed={cfg.seed}")
    num_listed = int(meta["num_pairs_in_benchmark"])
    indices = select_indices(num_listed if limit is None else min(num_listed, int(limit)), subset, cfg.get("shard"))
    wanted = set(indices)
    records = [r for r in load_records(cfg.merge) if r["pair_index"] in wanted]
    missing = sorted(wanted - {r["pair_index"] for r in records})
    if missing and not cfg.get("merge_partial", False):
        raise ValueError(f"merge: {len(missing)} of {len(indices)} pairs have no record in {list(cfg.merge)} "
                         f"(first: {missing[:10]}); give the run directories of all shards, or "
                         "merge_partial=true to score the recorded pairs only (metrics.json lists the missing)")
    if missing:
        log.warning("merge: %d of %d pairs have no record (first: %s); scoring the %d recorded (merge_partial)",
                    len(missing), len(indices), missing[:10], len(records))
    versions = meta["versions"][0] if len(meta["versions"]) == 1 else meta["versions"]
    if len(meta["versions"]) > 1:
        log.warning("merge: the runs were made with different software versions: %s", meta["versions"])
    return records, {"versions": versions, "dtype": meta["dtype"], "precision_scope": meta["precision_scope"],
                     "matches_from": meta["matches_from"],
                     "model": meta["model"], "checkpoint": meta["checkpoint"],
                     "checkpoint_sha256": meta["checkpoint_sha256"], "dataset_warnings": meta["dataset_warnings"],
                     "num_pairs_in_benchmark": num_listed, "missing_pairs": missing}


def evaluated_records(cfg, bench, out_dir: Path, rank: int, world: int, local_rank: int,
                      gather_group, subset=None) -> tuple[list[dict], dict]:
    """Build the model and evaluate the selected pairs (this process's share of those without a record
    in the ``resume=`` run), journaling each record; returns every rank's records (with the resumed
    ones) and the run's facts for ``metrics.json`` (model, checkpoint, devices, resolutions, ...)."""
    num_listed = bench.num_listed
    indices = select_indices(len(bench), subset, cfg.get("shard"))
    run_dir = out_dir  # where the outputs and every rank's journal go: rank 0's run directory
    if world > 1:  # every rank must mean the same pairs by the same indices (node-local copies may differ)
        listed = hashlib.sha1("\n".join(bench.pair_id(p) for p in bench.pairs()).encode()).hexdigest()
        seen = all_ranks((num_listed, len(bench), listed, str(out_dir)), gather_group)
        if len({s[:3] for s in seen}) > 1:
            raise ValueError("the ranks list different pairs (" + "; ".join(
                f"rank {r}: {n} listed, {k} kept, ids {h[:8]}" for r, (n, k, h, _) in enumerate(seen))
                + "): give every rank the same dataset tree")
        run_dir = Path(seen[0][3])
        if rank == 0 and len({s[3] for s in seen}) > 1:
            log.warning("the ranks' Hydra run directories differ (%s): rank 0 writes the outputs and every rank "
                        "its journal into %s; give hydra.run.dir so that all share one", sorted({s[3] for s in seen}),
                        run_dir)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: expected one of {sorted(DTYPES)}")
    scope = cfg.get("precision_scope", "refiners")
    if scope not in PRECISION_SCOPES:
        raise ValueError(f"precision_scope={scope!r}: expected one of {list(PRECISION_SCOPES)}")
    if cfg.get("save_matches") and not bench.sparse_matching:
        raise ValueError(f"save_matches=true: {bench.name} scores the dense warp, not sparse matches; only the "
                         "sparse protocols (hpatches, scannet, yfcc, megadepth1500, ...) save matches")
    replay = saved_matches_source(cfg, bench, indices, run_dir) if cfg.get("matches_from") else None
    if replay is not None:  # no model: the matches of the saved run, with its model, checkpoint and dtype
        model_cfg, ckpt, ckpt_hash = replay["model"], replay["checkpoint"], replay["checkpoint_sha256"]
        dtype, scope = replay["dtype"], replay["precision_scope"]
    else:
        model_cfg, ckpt, ckpt_hash = model_source(cfg)
        dtype = cfg.dtype
        if model_cfg.get("arch") == "sift":  # OpenCV's SIFT: on the CPU, in float32, whatever was asked
            if cfg.dtype != "float32" or cfg.device not in ("auto", "cpu"):
                log.warning("model=sift runs OpenCV on the CPU in float32: dtype=%s, device=%s do not apply",
                            cfg.dtype, cfg.device)
            dtype = scope = None
    identity = identity_of(bench.name, OmegaConf.to_container(cfg.benchmark, resolve=True), cfg.seed, model_cfg,
                           ckpt_hash, dtype, scope)
    resume_dir = resume_directory(cfg.get("resume"), run_dir)
    resumed, origins, resumed_from = prior_records(resume_dir, run_dir, identity, bench, rank, world, gather_group)
    if cfg.get("resume_retry_failed", False):  # pairs recorded as failed (e.g. a full GPU, a flaky mount) run again
        retried = {r["pair_index"] for r in resumed if r.get("failed")} & set(indices)
        resumed = [r for r in resumed if r["pair_index"] not in retried]
    done = {r["pair_index"] for r in resumed} & set(indices)  # the selected pairs the resumed run recorded
    versions = software_versions() if rank == 0 else None  # (rank 0 writes the outputs)
    versions = all_ranks(versions, gather_group)[0]
    used_versions = [json.loads(v) for v in sorted({json.dumps(origins[i]["versions"], sort_keys=True) for i in done})]
    if rank == 0 and any(v != versions for v in used_versions):
        log.warning("resume: records of %s were made with other software versions (%s; now %s); they are kept",
                    resumed_from, [v for v in used_versions if v != versions], versions)

    if replay is not None:
        model, device = replay["matcher"], torch.device("cpu")  # (the estimators run on the CPU)
        resolution, upsample_res = replay["effective_resolution"], replay["effective_upsample_res"]
    else:
        if world > 1 and local_rank > 0:  # each node's first process first: a download lands in its cache once
            torch.distributed.barrier()
        model = build_model(model_cfg)  # weights loaded strictly by dkm.models.zoo.load_weights
        if world > 1 and local_rank == 0:
            torch.distributed.barrier()
        device = torch.device("cpu") if dtype is None else resolve_device(cfg.device, local_rank if world > 1 else None)
        model = model.to(device).eval()
        if hasattr(model, "inference_dtype"):
            model.inference_dtype, model.inference_precision_scope = DTYPES[cfg.dtype], scope
        resolution, upsample_res = bench.effective_resolution(model), bench.effective_upsample_res(model)
    notes = bench.completeness_warnings()  # how the dataset differs from the published one
    for note in notes if rank == 0 else ():
        log.warning(note)
    log.info("evaluating %s on %s (%d of %d pairs) on %s, internal resolution %s, upsampling pass %s",
             model_cfg.get("arch"), bench.name, len(indices), num_listed, device, resolution, upsample_res)
    if resumed_from is not None:
        log.info("resume: %d of the %d pairs have a record in %s; evaluating the other %d", len(done),
                 len(indices), resumed_from, len(indices) - len(done))
    on_matches = None
    if cfg.get("save_matches"):  # each pair's matches into <run dir>/matches/, those carried over by a resume too
        on_matches = functools.partial(save_matches, run_dir, identity_json=json.dumps(identity, default=_json_default))
        if rank == 0 and resumed_from is not None and resumed_from.resolve() != run_dir.resolve():
            failed = {r["pair_index"] for r in resumed if r.get("failed")}  # (may have failed before matching)
            unsaved = [i for i in copy_saved_matches(resumed_from, run_dir, sorted(done)) if i not in failed]
            if unsaved:
                log.warning("save_matches: %d of the %d pairs resumed from %s have no saved matches there (first: "
                            "%s); matches_from=%s will refuse them", len(unsaved), len(done), resumed_from,
                            unsaved[:10], run_dir)
    mine = shard_indices([i for i in indices if i not in done], rank, world)
    if world > 1:
        log.info("rank %d of %d: %d of the %d pairs", rank, world, len(mine), len(indices) - len(done))

    header = {"identity": identity, "device": str(device), "rank": rank, "world": world, "versions": versions}
    with open_journal(run_dir, header, resumed, origins, rank, world, gather_group) as journal:
        try:
            records = bench.evaluate_pairs(model, mine, progress=cfg.progress and rank == 0, on_record=journal.write,
                                           on_matches=on_matches)
        except BaseException:
            log.error("stopped after %d pairs of this process, journaled in %s: resume=%s (or, with "
                      "hydra.run.dir=%s, resume=true) evaluates the others", journal.num_written, journal.path,
                      run_dir, run_dir)
            raise
    carried = [r for r in resumed if r["pair_index"] in done] if rank == 0 else []
    records = gather_records(records + carried, group=gather_group)  # every rank's, every pair once, by index
    return records, {
        "model": model_cfg, "checkpoint": None if ckpt is None else str(ckpt), "checkpoint_sha256": ckpt_hash,
        "dataset_warnings": notes, "num_pairs_in_benchmark": num_listed, "device": str(device),
        "devices": [str(d) for d in all_ranks(device, gather_group)],
        "model_settings": {k: v for k, v in bench.model_settings().items() if hasattr(model, k)},
        "effective_resolution": resolution, "effective_upsample_res": upsample_res,
        "versions": versions, "dtype": dtype, "precision_scope": scope,
        "matches_from": None if replay is None else [str(d) for d in replay["matcher"].run_dirs],
        "resumed": None if resumed_from is None else {
            "from": str(resumed_from), "num_pairs": len(done),
            "devices": sorted({str(origins[i]["device"]) for i in done}), "versions": used_versions}}


def model_source(cfg) -> tuple[dict, str | None, str | None]:
    """The model config to build (``cfg.model``, with ``cfg.ckpt`` as its weights and, for a ``.ckpt``
    of train.py, the settings it was trained with), the checkpoint given and the weights' sha256."""
    model_cfg, ckpt, ckpt_hash = OmegaConf.to_container(cfg.model, resolve=True), cfg.ckpt, None
    if ckpt is not None:
        if model_cfg.get("arch") == "sift":
            raise ValueError("ckpt= was given but model=sift has no weights; choose a DKM model (model=dkm_base)")
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"ckpt={ckpt}: no such checkpoint file")
        model_cfg = model_config_for(model_cfg, ckpt)
    if model_cfg.get("weights"):
        ckpt_hash = sha256_file(model_cfg["weights"])
    elif model_cfg.get("arch") != "sift" and not model_cfg.get("pretrained"):
        log.warning("no ckpt= and model.pretrained=false: evaluating an untrained %s", model_cfg.get("arch"))
    return model_cfg, ckpt, ckpt_hash


def saved_matches_source(cfg, bench, indices: list[int], run_dir: Path) -> dict:
    """``matches_from=<run dir or [run dirs]>``: the saved matches of those finished runs (one run, or
    the shards of one) as a matcher, and what they were made with (model config, checkpoint, dtype,
    resolution) for this run's identity and metrics.json. Refused: a dense protocol, another benchmark,
    other values of the protocol keys that decide the matches (:data:`MATCHING_KEYS`) or of the seed
    (it seeds the draw of the matches and the estimators), other pair ids, selected pairs the runs did
    not evaluate or matched without saving, files of another run, and ``run_dir`` being one of them."""
    dirs = cfg.matches_from
    dirs = [str(dirs)] if isinstance(dirs, (str, Path)) else [str(d) for d in dirs]
    if not bench.sparse_matching:
        raise ValueError(f"matches_from=: {bench.name} scores the dense warp, not sparse matches")
    if cfg.get("save_matches"):
        raise ValueError("matches_from= with save_matches=true: the matches are saved already, in " + ", ".join(dirs))
    if any(Path(d).resolve() == Path(run_dir).resolve() for d in dirs):
        raise ValueError(f"matches_from={run_dir} into its own directory would replace the saved run's outputs: "
                         "give this run another hydra.run.dir")
    meta = load_run_metadata(dirs, what="matches_from")  # (refuses runs that differ among themselves)
    if meta["benchmark"] != bench.name:
        raise ValueError(f"matches_from: {dirs} evaluated benchmark {meta['benchmark']!r}, not {bench.name!r}")
    if cfg.get("ckpt") is not None and (not Path(cfg.ckpt).is_file() or sha256_file(cfg.ckpt) != meta["checkpoint_sha256"]):
        raise ValueError(f"matches_from: ckpt={cfg.ckpt} is not the checkpoint that made the saved matches "
                         f"({meta['checkpoint']}, sha256 {meta['checkpoint_sha256']}); matches_from= runs no model: "
                         "leave ckpt= out")
    if meta["seed"] is not None and meta["seed"] != cfg.seed:
        raise ValueError(f"matches_from: the saved matches were drawn with seed={meta['seed']}, this command gives "
                         f"seed={cfg.seed} (the seed draws the matches and seeds the estimators): give "
                         f"seed={meta['seed']}")
    given = OmegaConf.to_container(cfg.benchmark, resolve=True)
    saved = meta["protocol"] or {}
    differ = [k for k in MATCHING_KEYS if canonical(given.get(k)) != canonical(saved.get(k))]
    if differ:
        raise ValueError(f"matches_from: the saved matches were made with {({k: saved.get(k) for k in differ})}, "
                         f"this command gives {({k: given.get(k) for k in differ})}: those keys decide the matches; "
                         "give the saved run's values (the others, e.g. RANSAC thresholds, may differ)")
    by_dir = {d: load_records([d], what="matches_from") for d in dirs}
    pairs = bench.pairs()
    wrong = [r for recs in by_dir.values() for r in recs
             if r["pair_index"] < len(pairs) and r["pair_id"] != bench.pair_id(pairs[r["pair_index"]])]
    if wrong:
        i = wrong[0]["pair_index"]
        raise ValueError(f"matches_from: {dirs} recorded pair {i} as {wrong[0]['pair_id']!r}, this dataset lists "
                         f"{bench.pair_id(pairs[i])!r} there: give the dataset tree those runs evaluated")
    source = identity_of(meta["benchmark"], meta["protocol"], meta["seed"], meta["model"] or {},
                         meta["checkpoint_sha256"], meta["dtype"], meta["precision_scope"])
    matcher = SavedMatches(source, by_dir)
    unrecorded, unsaved = matcher.unusable(indices)
    if unrecorded:
        raise ValueError(f"matches_from: {len(unrecorded)} of the {len(indices)} selected pairs were not evaluated "
                         f"by {dirs} (first: {unrecorded[:10]}); select the pairs they evaluated (subset=, limit=) "
                         "or give the directories of all their shards")
    if unsaved:
        raise ValueError(f"matches_from: {len(unsaved)} of the {len(indices)} selected pairs have no saved matches "
                         f"in {dirs} (first: {unsaved[:10]}); were they evaluated with save_matches=true? (a merge= "
                         "run has none: give the shards' directories)")
    for i in indices[:1]:  # a directory whose files are another run's is refused here, not pair by pair
        matcher.check_identity(i)
    first = _read_json(Path(dirs[0]) / "metrics.json").get("protocol") or {}
    return {"matcher": matcher, "model": {"arch": "saved_matches", "source": source},
            "checkpoint": meta["checkpoint"], "checkpoint_sha256": meta["checkpoint_sha256"],
            "dtype": meta["dtype"], "precision_scope": meta["precision_scope"],
            "effective_resolution": first.get("effective_resolution"),
            "effective_upsample_res": first.get("effective_upsample_res")}


def identity_of(benchmark, protocol, seed, model_cfg: Mapping, ckpt_hash, dtype, precision_scope) -> dict:
    """What decides a pair's record (journals of another identity are not resumed, runs of another
    identity not merged): benchmark, protocol (without the data root), seed, the model config (with a
    checkpoint file its sha256 instead of the path and of how the weights were found) and, for DKM
    models, the dtype (and the precision scope where the dtype is reduced)."""
    ignored = {"weights"} | ({"pretrained", "backbone_weights"} if ckpt_hash else set())
    identity = {"benchmark": benchmark, "protocol": comparable_protocol(protocol), "seed": seed,
                "model": {k: v for k, v in dict(model_cfg).items() if k not in ignored}, "checkpoint_sha256": ckpt_hash}
    if model_cfg.get("arch") != "sift":  # (SIFT has no reduced precision)
        identity["dtype"] = dtype
        if dtype != "float32":
            identity["precision_scope"] = precision_scope
    return identity


def resume_directory(resume, out_dir: Path) -> Path | None:
    """``resume=``: ``null``/``false`` none, ``true`` this run's own directory (``hydra.run.dir``), or a
    run directory."""
    if resume is None or resume is False:
        return None
    if resume is True:
        return out_dir
    if not isinstance(resume, (str, Path)):
        raise ValueError(f"resume={resume!r}: expected true (this run directory) or one run directory")
    return Path(resume)


def refuse_interrupted_run(run_dir: Path) -> None:
    """Stop if ``run_dir`` holds the journals of an interrupted evaluation (journals, no metrics.json:
    a finished run's metrics.json is removed when a new run starts there), which a run into it would
    replace."""
    found = journals_in(run_dir)
    if found and not (run_dir / "metrics.json").exists():
        raise ValueError(f"{run_dir} holds the journals of an interrupted evaluation "
                         f"({', '.join(p.name for p in found)}): resume=true continues it; remove them (or choose "
                         "another hydra.run.dir) to start again")


def prior_records(resume_dir: Path | None, out_dir: Path, identity: Mapping, bench, rank: int, world: int,
                  group) -> tuple[list[dict], dict[int, dict], Path | None]:
    """The records journaled in ``resume_dir`` (all of them), the origin of each (by pair index:
    ``{"device", "versions"}``) and the directory they came from (``None``: nothing resumed), read by
    rank 0 and passed to every rank. Resuming this run's own directory before it has a journal (a
    job's first start) starts afresh. Refused, on every rank: journals of another identity, records
    whose pair id is not the one this dataset lists at their index, and an interrupted run's journals
    in ``out_dir`` that this run would replace (``out_dir`` is not the one resumed)."""
    def read() -> tuple[list[dict], dict[int, dict], Path | None]:
        own = resume_dir is not None and resume_dir.resolve() == out_dir.resolve()
        if not own:
            refuse_interrupted_run(out_dir)
        if resume_dir is None or (own and not journals_in(out_dir)):
            if own:
                log.info("resume: %s has no journal yet; evaluating every pair", out_dir)
            return [], {}, None
        records, origins = read_journals(resume_dir, identity)
        pairs = bench.pairs()
        wrong = [r for r in records
                 if r["pair_index"] < len(pairs) and r.get("pair_id") != bench.pair_id(pairs[r["pair_index"]])]
        if wrong:
            i = wrong[0]["pair_index"]
            raise ValueError(f"resume: {resume_dir} recorded pair {i} as {wrong[0].get('pair_id')!r}, this dataset "
                             f"lists {bench.pair_id(pairs[i])!r} there ({len(wrong)} such pairs): resume with the "
                             "dataset tree that run evaluated")
        return records, origins, resume_dir

    if world == 1:
        return read()
    payload, error = None, None
    if rank == 0:
        try:
            payload = read()
        except Exception as e:  # raised on every rank below, not on rank 0 alone
            payload = error = e
    payload = all_ranks(payload, group)[0]
    if error is not None:
        raise error
    if isinstance(payload, BaseException):
        raise payload
    return payload


def open_journal(run_dir: Path, header: dict, resumed: list[dict], origins: Mapping[int, dict], rank: int,
                 world: int, group) -> RecordJournal:
    """This process's journal in ``run_dir`` (rank 0's run directory, for every rank). Rank 0 writes its
    own first, durably (with the ``resumed`` records, so that this run's journals hold all its records,
    whatever directory it resumed), then removes the other journals there and the outputs of an earlier
    finished run (so that journals without metrics.json always mean an interrupted run) and the saved
    matches of the pairs it does not carry over; the other ranks open theirs after that."""
    journal = None
    if rank == 0:
        journal = RecordJournal(journal_path(run_dir, 0), header, resumed, origins, default=_json_default)
        for stale in [*journals_in(run_dir), *(run_dir / n for n in ("metrics.json", "records.json", "pairs.csv"))]:
            if stale != journal.path and stale.exists():
                stale.unlink()
        remove_saved_matches(run_dir, keep=(r["pair_index"] for r in resumed))  # (a file: this run matched it)
        fsync_dir(run_dir)
    if world > 1:
        all_ranks(None, group)  # (a barrier)
    if journal is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        journal = RecordJournal(journal_path(run_dir, rank), header, default=_json_default)
    return journal


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
