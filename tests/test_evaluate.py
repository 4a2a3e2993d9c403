"""evaluate.py's body in-process (Hydra compose): subsets, shards and merging, config errors."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dkm.evaluation import evaluate_benchmark, select_indices
from synthetic_benchmarks import make_hpatches

REPO = Path(__file__).resolve().parents[1]


def cfg_for(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def test_select_indices():
    assert select_indices(5) == [0, 1, 2, 3, 4]
    assert select_indices(10, "2:5") == [2, 3, 4]
    assert select_indices(10, [7, 1]) == [7, 1]
    assert select_indices(10, None, "1/3") == [1, 4, 7]
    assert select_indices(10, "0:6", "0/2") == [0, 2, 4]
    with pytest.raises(ValueError, match="out of range"):
        select_indices(3, [3])
    with pytest.raises(ValueError, match="k/m"):
        select_indices(3, None, "3/3")
    # an empty selection stops the run before the model is built (it used to fail in the metrics)
    with pytest.raises(ValueError, match=r"subset=\[\] selects none of the 3 pairs"):
        select_indices(3, [])
    with pytest.raises(ValueError, match=r"shard='3/4' selects none of the 3 pairs \(more shards than pairs\)"):
        select_indices(3, None, "3/4")


@pytest.fixture(scope="module")
def tiny_hpatches(tmp_path_factory):
    return make_hpatches(tmp_path_factory.mktemp("hp"), seqs=("v_a",), seed=7)


def test_shards_merge_to_the_full_run(tiny_hpatches, tmp_path):
    common = ["benchmark=hpatches", "model=sift", "model.num_features=1500", f"data_root={tiny_hpatches}",
              "progress=false"]
    full = evaluate_benchmark(cfg_for(*common), tmp_path / "full")
    for k in range(2):
        evaluate_benchmark(cfg_for(*common, f"shard={k}/2"), tmp_path / f"s{k}")
    rows = [list(csv.DictReader(open(tmp_path / f"s{k}" / "pairs.csv"))) for k in range(2)]
    assert [r["pair_index"] for r in rows[0]] == ["0", "2", "4"] and [r["pair_index"] for r in rows[1]] == ["1", "3"]
    merged = evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'},{tmp_path / 's1'},{tmp_path / 's0'}]"),
                                tmp_path / "merged")
    assert merged == full  # every pair seeded by its index: same records whatever the split
    result = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    assert result["metrics"]["num_pairs"] == 5 and len(result["merged_from"]) == 3
    assert result["model"]["arch"] == "sift" and result["num_pairs_in_benchmark"] == 5  # from the shards
    assert len(result["dataset_warnings"]) == 1 and "1 of 59 v_" in result["dataset_warnings"][0]
    # merging reads no dataset: the shards' records and metrics.json are enough
    elsewhere = evaluate_benchmark(cfg_for(*common[:-2], f"data_root={tmp_path / 'gone'}", "progress=false",
                                           f"merge=[{tmp_path / 's0'},{tmp_path / 's1'}]"), tmp_path / "merged2")
    assert elsewhere == full
    # a shard left out: refused (its pairs would vanish from the metrics), or scored without it on request
    with pytest.raises(ValueError, match=r"merge: 2 of 5 pairs have no record .* \(first: \[1, 3\]\)"):
        evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'}]"), tmp_path / "partial")
    assert not (tmp_path / "partial" / "metrics.json").exists()
    partial = evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'}]", "merge_partial=true"),
                                 tmp_path / "partial")
    res = json.loads((tmp_path / "partial" / "metrics.json").read_text())
    assert partial["num_pairs"] == 3 and res["missing_pairs"] == [1, 3] and result["missing_pairs"] == []
    (tmp_path / "torn").mkdir()
    for name in ("metrics.json", "records.json"):
        (tmp_path / "torn" / name).write_text((tmp_path / "s1" / name).read_text()[:40])
    with pytest.raises(ValueError, match=r"merge: .*torn/(metrics|records)\.json is not valid JSON"):
        evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'},{tmp_path / 'torn'}]"), tmp_path / "m4")
    with pytest.raises(ValueError, match=r"differ in \[.*'model.arch'"):
        other = json.loads((tmp_path / "s1" / "metrics.json").read_text())
        (tmp_path / "s1" / "metrics.json").write_text(json.dumps(other | {"model": {"arch": "dkm_base"}}))
        evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'},{tmp_path / 's1'}]"), tmp_path / "merged3")
    for name in ("full", "s0"):
        res = json.loads((tmp_path / name / "metrics.json").read_text())
        assert res["protocol"]["num_samples"] == 20000 and res["protocol"]["effective_resolution"] is None
        assert res["protocol"]["data_root"] == str(tiny_hpatches)  # the root used, not the config default
        assert res["model"]["arch"] == "sift" and res["checkpoint_sha256"] is None
        assert "1 of 59 v_" in res["dataset_warnings"][0]  # a one-sequence HPatches tree, noted


def test_merge_selects_what_its_shards_selected(tiny_hpatches, tmp_path):
    """Shards of a ``limit=``/``subset=`` run merge without repeating it (the runs' metrics.json say
    it); a merge command's own selection still wins. SIFT records no dtype and runs on the CPU."""
    common = ["benchmark=hpatches", "model=sift", "model.num_features=500", f"data_root={tiny_hpatches}",
              "progress=false"]
    full = evaluate_benchmark(cfg_for(*common, "limit=4", "dtype=bfloat16"), tmp_path / "full")
    res = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert (res["dtype"], res["precision_scope"], res["device"]) == (None, None, "cpu") and res["limit"] == 4
    for k in range(2):
        evaluate_benchmark(cfg_for(*common, "limit=4", f"shard={k}/2"), tmp_path / f"s{k}")
    shards = f"merge=[{tmp_path / 's0'},{tmp_path / 's1'}]"
    assert evaluate_benchmark(cfg_for(*common, shards), tmp_path / "m") == full
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["limit"] == 4
    assert evaluate_benchmark(cfg_for(*common, shards, "subset=[1,2]"), tmp_path / "m2")["num_pairs"] == 2
    assert json.loads((tmp_path / "m2" / "metrics.json").read_text())["subset"] == [1, 2]
    for k in range(2):
        evaluate_benchmark(cfg_for(*common, "subset=[4,0,3]", f"shard={k}/2"), tmp_path / f"t{k}")
    merged = evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 't0'},{tmp_path / 't1'}]"), tmp_path / "m3")
    assert merged == evaluate_benchmark(cfg_for(*common, "subset=[4,0,3]"), tmp_path / "direct")
    assert json.loads((tmp_path / "m3" / "metrics.json").read_text())["subset"] == [4, 0, 3]


def test_merge_refuses_shards_of_other_protocols_or_seeds(tiny_hpatches, tmp_path):
    """Shards evaluated with another protocol (same benchmark name and pair count) or seed, or merged
    with a protocol other than theirs, are refused: their records would not be one evaluation."""
    common = ["benchmark=hpatches", "model=sift", "model.num_features=500", f"data_root={tiny_hpatches}",
              "progress=false"]
    evaluate_benchmark(cfg_for(*common, "shard=0/2"), tmp_path / "s0")
    evaluate_benchmark(cfg_for(*common, "shard=1/2", "benchmark.num_samples=1000"), tmp_path / "s1")
    evaluate_benchmark(cfg_for(*common, "shard=1/2", "seed=5"), tmp_path / "s1_seed")
    evaluate_benchmark(cfg_for(*common, "shard=1/2"), tmp_path / "s1_same")
    with pytest.raises(ValueError, match=r"differ in \['protocol.num_samples'\] \(.*s0: \[20000\]; .*s1: \[1000\]\)"):
        evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'},{tmp_path / 's1'}]"), tmp_path / "m1")
    with pytest.raises(ValueError, match=r"differ in \['seed'\]"):
        evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'},{tmp_path / 's1_seed'}]"), tmp_path / "m2")
    with pytest.raises(ValueError, match=r"another protocol .*num_samples"):
        evaluate_benchmark(cfg_for(*common, "benchmark.num_samples=1000",
                                   f"merge=[{tmp_path / 's0'},{tmp_path / 's1_same'}]"), tmp_path / "m3")
    with pytest.raises(ValueError, match="seed=0, this command seed=5"):
        evaluate_benchmark(cfg_for(*common, "seed=5", f"merge=[{tmp_path / 's0'},{tmp_path / 's1_same'}]"),
                           tmp_path / "m4")
    evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'},{tmp_path / 's1_same'}]"), tmp_path / "m5")


def test_config_errors_fail_at_start(tiny_hpatches, tmp_path):
    with pytest.raises(FileNotFoundError, match="hpatches-sequences-release"):
        evaluate_benchmark(cfg_for("benchmark=hpatches", "model=sift", f"data_root={tmp_path / 'none'}"), tmp_path / "a")
    with pytest.raises(ValueError, match="model=sift has no weights"):
        evaluate_benchmark(cfg_for("model=sift", f"data_root={tiny_hpatches}", f"ckpt={tmp_path / 'x.pth'}"),
                           tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        evaluate_benchmark(cfg_for("model=dkm_small", f"data_root={tiny_hpatches}", f"ckpt={tmp_path / 'x.pth'}"),
                           tmp_path / "c")
    for bad, match in (("dtype=float8", "dtype='float8'"), ("precision_scope=all", "precision_scope='all'")):
        with pytest.raises(ValueError, match=match):
            evaluate_benchmark(cfg_for("model=dkm_small", f"data_root={tiny_hpatches}", bad), tmp_path / "d")
    assert not (tmp_path / "a" / "metrics.json").exists()


def test_checkpoint_hash_and_internal_resolution(tiny_hpatches, tmp_path):
    """A DKM checkpoint (the small architecture, random weights) goes through load_weights; its sha256
    and the protocol's internal resolution land in metrics.json, and the model gets its own back."""
    import hashlib

    import torch

    from dkm.models.zoo import build_model

    model = build_model({"arch": "dkm_small", "h": 64, "w": 96, "weights": None, "pretrained": False})
    ckpt = tmp_path / "small.pth"
    torch.save(model.state_dict(), ckpt)
    cfg = cfg_for("benchmark=hpatches", "model=dkm_small", "model.h=64", "model.w=96", f"ckpt={ckpt}",
                  f"data_root={tiny_hpatches}", "subset=[0]", "benchmark.resolution=[32,48]",
                  "benchmark.num_samples=500", "device=cpu", "progress=false", "dtype=bfloat16",
                  "precision_scope=network")
    metrics = evaluate_benchmark(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert res["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert res["protocol"]["effective_resolution"] == [32, 48]
    assert res["protocol"]["effective_upsample_res"] is None  # v11 has no upsampling pass
    assert (res["dtype"], res["precision_scope"]) == ("bfloat16", "network")
    assert metrics["num_pairs"] == 1
    row = next(csv.DictReader(open(tmp_path / "run" / "pairs.csv")))
    assert int(row["num_matches"]) == 500


def test_dkmv3_outdoor_on_megadepth_8_scenes_runs_the_upsampling_pass(tmp_path):
    """evaluate.py model=dkmv3_outdoor benchmark=megadepth_8_scenes: the benchmark's own name, the
    upsampling resolution taken from the benchmark config, the returned matches at that resolution."""
    import torch

    from dkm.benchmarks.megadepth1500 import EIGHT_SCENES
    from dkm.models.zoo import build_model
    from synthetic_benchmarks import make_megadepth1500

    root = make_megadepth1500(tmp_path / "mega", scene_names=EIGHT_SCENES[:1], hw=(96, 128))
    model = build_model({"arch": "dkmv3_outdoor", "h": 32, "w": 48, "upsample_res": [48, 64],
                         "backbone_weights": None})
    ckpt = tmp_path / "v3.pth"
    torch.save(model.state_dict(), ckpt)
    cfg = cfg_for("benchmark=megadepth_8_scenes", "model=dkmv3_outdoor", "model.backbone_weights=null",
                  f"ckpt={ckpt}", f"data_root={root}", f"benchmark.scene_names=[{EIGHT_SCENES[0]}]",
                  "benchmark.resolution=[32,48]", "benchmark.upsample_res=[64,96]", "benchmark.num_samples=300",
                  "device=cpu", "progress=false")
    metrics = evaluate_benchmark(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert res["benchmark"] == "megadepth_8_scenes" and metrics["num_pairs"] == 1
    assert res["protocol"]["effective_resolution"] == [32, 48]
    assert res["protocol"]["effective_upsample_res"] == [64, 96]
    assert res["model_settings"] == {"h_resized": 32, "w_resized": 48, "upsample_preds": True,
                                     "upsample_res": [64, 96]}  # what the benchmark set on the model
    row = next(csv.DictReader(open(tmp_path / "run" / "pairs.csv")))
    assert row["failed"] == "False" and int(row["num_matches"]) == 300, row


def test_lightning_checkpoint_brings_its_model_config(tiny_hpatches, tmp_path):
    """A train.py .ckpt stores the model config it was trained with: evaluate.py builds that
    architecture at that resolution, whatever model= says (here the default dkm_base); the inference
    path (``fast``) and the weight sources stay the command line's."""
    import torch

    from dkm.models.zoo import build_model

    trained = {"arch": "dkm_small", "h": 64, "w": 96, "weights": None, "pretrained": False,
               "backbone_weights": "/elsewhere/resnet50.pth", "fast": False}
    model = build_model(trained | {"backbone_weights": None})
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": trained, "loss": {}, "optim": {}}}, ckpt)
    cfg = cfg_for("benchmark=hpatches", f"ckpt={ckpt}", f"data_root={tiny_hpatches}", "subset=[0]",
                  "benchmark.num_samples=200", "device=cpu", "progress=false")
    evaluate_benchmark(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert res["model"]["arch"] == "dkm_small" and (res["model"]["h"], res["model"]["w"]) == (64, 96)
    assert res["protocol"]["effective_resolution"] == [64, 96] and res["model"]["weights"] == str(ckpt)
    assert res["model"]["fast"] is True and res["model"]["backbone_weights"] is None


@pytest.mark.parametrize("limit", [-1, 0, 2.5])
def test_limit_must_be_a_positive_count(tiny_hpatches, tmp_path, limit):
    """A negative limit would drop pairs from the end (a Python slice), 0 would score nothing."""
    with pytest.raises(ValueError, match=f"limit={limit!r}: expected a positive number of pairs"):
        evaluate_benchmark(cfg_for("benchmark=hpatches", "model=sift", f"data_root={tiny_hpatches}",
                                   f"limit={limit}", "progress=false"), tmp_path / "run")


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path):
    """A write that fails half-way (a crash, a full disk) leaves the previous file and no stub."""
    from dkm.utils.files import atomic_write, atomic_write_text

    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"auc": 1}')

    def fails(f):
        f.write(b'{"auc": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == '{"auc": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_torchrun_splits_the_pairs_and_writes_what_one_process_writes(tiny_hpatches, tmp_path):
    """``torchrun --nproc-per-node=2 evaluate.py ...`` (CPU, gloo): the two processes evaluate pairs 0, 2, 4
    and 1, 3 of the five, rank 0 writes the records and metrics of a one-process run (seeded per pair)."""
    import subprocess
    import sys

    common = ["benchmark=hpatches", "model=sift", "model.num_features=1500", f"data_root={tiny_hpatches}",
              "progress=false", "device=cpu"]
    single = evaluate_benchmark(cfg_for(*common), tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "evaluate.py"), *common, f"hydra.run.dir={tmp_path / 'two'}"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "rank 0 of 2: 3 of the 5 pairs" in out and "rank 1 of 2: 2 of the 5 pairs" in out

    def records(d):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((d / "records.json").read_text())]

    assert records(tmp_path / "two") == records(tmp_path / "one") and len(records(tmp_path / "two")) == 5
    result = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert result["metrics"] == single and result["num_ranks"] == 2 and result["devices"] == ["cpu", "cpu"]
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["num_ranks"] == 1
    assert "[rank 1] rank 1 of 2" in out and "[rank 0]" not in out
    assert [[r["pair_index"] for r in _journal(tmp_path / "two", k)[1:]] for k in (0, 1)] == [[0, 2, 4], [1, 3]]
    # a one-process run stopped after two pairs, resumed by two processes: they split the other three
    (tmp_path / "cut").mkdir()
    lines = (tmp_path / "one" / "records.rank0.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "records.rank0.jsonl").write_text("".join(lines[:3]))
    res = subprocess.run([*cmd[:-1], f"resume={tmp_path / 'cut'}", f"hydra.run.dir={tmp_path / 'resumed'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "rank 0 of 2: 2 of the 3 pairs" in out and "rank 1 of 2: 1 of the 3 pairs" in out
    assert records(tmp_path / "resumed") == records(tmp_path / "one")
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["resumed"]["num_pairs"] == 2
    # rank 0 reads the journals; what it finds wrong stops every rank with the same error
    res = subprocess.run([*cmd[:-1], f"resume={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'bad'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and (res.stdout + res.stderr).count("FileNotFoundError: resume: no journal") == 2
    # a Hydra multirun: its jobs run one after the other in the same processes (one process group)
    cmd = [*cmd[:6], "-m", *common, f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())["metrics"]["num_pairs"] == 5


def test_ranks_with_different_dataset_trees_are_refused(tiny_hpatches, tmp_path):
    """Under torchrun every rank must list the same pairs (node-local copies of a dataset can differ):
    rank 1 sees one sequence more than rank 0, and both stop before any pair is matched."""
    import shutil
    import subprocess
    import sys

    other = shutil.copytree(tiny_hpatches, tmp_path / "other")
    shutil.copytree(other / "hpatches-sequences-release" / "v_a", other / "hpatches-sequences-release" / "v_b")
    script = tmp_path / "run.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_evaluate import cfg_for
from dkm.evaluation import evaluate_benchmark
root = {str(tiny_hpatches)!r} if os.environ["RANK"] == "0" else {str(other)!r}
evaluate_benchmark(cfg_for("benchmark=hpatches", "model=sift", "data_root=" + root, "progress=false"), {str(tmp_path / "out")!r})
""")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "the ranks list different pairs (rank 0: 5 listed, 5 kept" in res.stderr and "rank 1: 10 listed" in res.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_launcher_detection_and_refusals(tiny_hpatches, tmp_path, monkeypatch):
    """Only torchrun's processes (TORCHELASTIC_RUN_ID) count as launched: a WORLD_SIZE left over from another job
    runs one process; merge= under torchrun, an srun step of several tasks without shard=, a GPU index under
    torchrun are refused."""
    from dkm.evaluation import resolve_device

    common = ["benchmark=hpatches", "model=sift", f"data_root={tiny_hpatches}", "progress=false", "limit=1"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    evaluate_benchmark(cfg_for(*common), tmp_path / "stray")
    assert json.loads((tmp_path / "stray" / "metrics.json").read_text())["num_ranks"] == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with pytest.raises(ValueError, match="merge= runs no model: run it as one process"):
        evaluate_benchmark(cfg_for("benchmark=hpatches", "model=sift", f"merge=[{tmp_path}]"), tmp_path / "m")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(ValueError, match=r"this srun step has 4 tasks.*shard=\$SLURM_PROCID/\$SLURM_NTASKS"):
        evaluate_benchmark(cfg_for(*common), tmp_path / "srun")
    evaluate_benchmark(cfg_for(*common, "shard=0/4"), tmp_path / "srun_shard")  # each task its share: fine
    with pytest.raises(ValueError, match="device=cuda:1 under torchrun: every process would use that GPU"):
        resolve_device("cuda:1", local_rank=0)
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="local rank 7 but .* visible GPUs"):
            resolve_device("cuda", local_rank=7)
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    assert select_indices(10, [4, 1, 1, 3]) == [4, 1, 3]  # a pair named twice is evaluated once


def _records(run_dir):
    """records.json without the timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((Path(run_dir) / "records.json").read_text())]


def _journal(run_dir, rank=0):
    return [json.loads(line) for line in (Path(run_dir) / f"records.rank{rank}.jsonl").read_text().splitlines()]


@pytest.fixture
def counted_pairs(monkeypatch):
    """The HPatches pairs evaluated (ids, in order); ``stop_at[0] = n`` interrupts the run (Ctrl-C) at the n-th;
    ``stop_at[1]``: a set of pair ids that fail (a RuntimeError, recorded and scored as a failure)."""
    from dkm.benchmarks import HpatchesHomogBenchmark

    real, calls, stop_at = HpatchesHomogBenchmark.evaluate_pair, [], [None, set()]

    def evaluate_pair(self, model, pair, ctx):
        calls.append(self.pair_id(pair))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        if self.pair_id(pair) in stop_at[1]:
            raise RuntimeError("a flaky mount")
        return real(self, model, pair, ctx)

    monkeypatch.setattr(HpatchesHomogBenchmark, "evaluate_pair", evaluate_pair)
    return calls, stop_at


def test_an_interrupted_run_resumes_to_the_records_of_an_uninterrupted_one(tiny_hpatches, tmp_path, counted_pairs):
    """Every record is journaled as its pair finishes; resume= evaluates only the pairs without one, and the
    resumed run's records and metrics are the uninterrupted run's (every pair seeded by its index)."""
    calls, stop_at = counted_pairs
    common = ["benchmark=hpatches", "model=sift", "model.num_features=1500", f"data_root={tiny_hpatches}",
              "progress=false"]
    full = evaluate_benchmark(cfg_for(*common), tmp_path / "full")
    journal = _journal(tmp_path / "full")
    assert journal[0]["identity"]["seed"] == 0 and journal[0]["identity"]["benchmark"] == "hpatches"
    assert [r["pair_index"] for r in journal[1:]] == [0, 1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in journal[1:]] == _records(tmp_path / "full")

    calls.clear()
    stop_at[0] = 3
    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmark(cfg_for(*common), tmp_path / "cut")
    assert not (tmp_path / "cut" / "metrics.json").exists() and len(_journal(tmp_path / "cut")) == 1 + 2

    calls.clear()
    stop_at[0] = None
    resumed = evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'cut'}"), tmp_path / "resumed")
    assert len(calls) == 3 and resumed == full and _records(tmp_path / "resumed") == _records(tmp_path / "full")
    result = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert result["resumed"] == {"from": str(tmp_path / "cut"), "num_pairs": 2, "devices": ["cpu"],
                                 "versions": [result["versions"]]}
    assert json.loads((tmp_path / "full" / "metrics.json").read_text())["resumed"] is None
    assert len(_journal(tmp_path / "resumed")) == 1 + 5  # the carried records too: this run can be resumed in turn

    calls.clear()  # resuming a finished run evaluates nothing; a subset of it scores that subset
    assert evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'resumed'}"), tmp_path / "again") == full
    evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'resumed'}", "subset=[1,3]"), tmp_path / "sub")
    assert calls == [] and [r["pair_index"] for r in _records(tmp_path / "sub")] == [1, 3]
    assert json.loads((tmp_path / "sub" / "metrics.json").read_text())["resumed"]["num_pairs"] == 2

    # resumed into its own directory (hydra.run.dir of the interrupted run), where another rank had journaled
    # pair 4: the same records, every journal read, one journal left that holds them all
    lines = (tmp_path / "full" / "records.rank0.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "records.rank1.jsonl").write_text(lines[0] + lines[5])
    assert evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'cut'}"), tmp_path / "cut") == full
    assert calls == ["v_a/1-4", "v_a/1-5"] and len(_journal(tmp_path / "cut")) == 1 + 5
    assert sorted(p.name for p in (tmp_path / "cut").glob("records.rank*")) == ["records.rank0.jsonl"]


def test_resume_refuses_another_run_and_reevaluates_a_torn_last_record(tiny_hpatches, tmp_path, counted_pairs,
                                                                        caplog):
    calls, _ = counted_pairs
    common = ["benchmark=hpatches", "model=sift", "model.num_features=1500", f"data_root={tiny_hpatches}",
              "progress=false"]
    full = evaluate_benchmark(cfg_for(*common), tmp_path / "full")
    lines = (tmp_path / "full" / "records.rank0.jsonl").read_text().splitlines(keepends=True)
    cut = tmp_path / "cut"
    cut.mkdir()
    journal = cut / "records.rank0.jsonl"
    journal.write_text("".join(lines[:4]) + lines[4][:25])  # killed while writing pair 3's record
    calls.clear()
    assert evaluate_benchmark(cfg_for(*common, f"resume={cut}"), tmp_path / "resumed") == full
    assert len(calls) == 2 and "its last line is incomplete" in caplog.text

    for overrides, match in [
        (["seed=1"], r"records.rank0.jsonl was written by a run that differs from this command in \['seed'\]"),
        (["benchmark.num_samples=500"], r"differs from this command in \['protocol.num_samples'\] \(there: \[20000\]; "
                                        r"here: \[500\]\)"),
        (["model.num_features=100"], r"differs from this command in \['model.num_features'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate_benchmark(cfg_for(*common, *overrides, f"resume={cut}"), tmp_path / "other")
    # what cannot change a record is not compared: 3 for the yaml's 3.0, a dtype SIFT does not have
    calls.clear()
    assert evaluate_benchmark(cfg_for(*common, "benchmark.ransac_thr=3", "dtype=float16", "precision_scope=network",
                                      f"resume={tmp_path / 'resumed'}"), tmp_path / "same") == full
    assert calls == []
    journal.write_text(lines[0] + lines[1].replace('"pair_id": "', '"pair_id": "v_x'))
    with pytest.raises(ValueError, match=r"recorded pair 0 as 'v_x.*this dataset lists 'v_a.* there"):
        evaluate_benchmark(cfg_for(*common, f"resume={cut}"), tmp_path / "other")
    journal.write_text(lines[0] + "not json\n" + lines[2])
    with pytest.raises(ValueError, match=r"records.rank0.jsonl, line 2, is not a JSON record"):
        evaluate_benchmark(cfg_for(*common, f"resume={cut}"), tmp_path / "other")
    journal.write_text("".join(lines[:3]) + "not json either\n")  # a whole line (with its newline): not torn
    with pytest.raises(ValueError, match=r"records.rank0.jsonl, line 4, is not a JSON record"):
        evaluate_benchmark(cfg_for(*common, f"resume={cut}"), tmp_path / "other")
    journal.write_text("".join(lines[1:3]))
    with pytest.raises(ValueError, match=r"does not start with the run's identity line"):
        evaluate_benchmark(cfg_for(*common, f"resume={cut}"), tmp_path / "other")
    journal.write_text(lines[0] + lines[1].replace('"pair_index": 0', '"pair_index": "0"'))
    with pytest.raises(ValueError, match=r"line 2, is not a pair record \(no integer 'pair_index'\)"):
        evaluate_benchmark(cfg_for(*common, f"resume={cut}"), tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"resume: no journal \(records.rank<k>.jsonl\) in .*empty"):
        evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'empty'}"), tmp_path / "other")
    with pytest.raises(ValueError, match="merge= and resume= together"):
        evaluate_benchmark(cfg_for(*common, f"resume={cut}", f"merge=[{tmp_path / 'full'}]"), tmp_path / "other")
    with pytest.raises(ValueError, match=r"resume=\[.*\]: expected true \(this run directory\) or one run directory"):
        evaluate_benchmark(cfg_for(*common, f"resume=[{cut},{cut}]"), tmp_path / "other")
    calls.clear()
    assert calls == [] and not (tmp_path / "other" / "metrics.json").exists()  # all refused before any pair


def test_resume_true_continues_the_run_directory_and_devices_follow_their_records(tiny_hpatches, tmp_path,
                                                                                    counted_pairs):
    """``resume=true hydra.run.dir=D``, the command a requeued job repeats: a first start evaluates every pair,
    a restart only the rest. Without resume= an interrupted run's journals in D are refused, not replaced.
    metrics.json's resumed devices are those of the records used, through a chain of resumes."""
    calls, stop_at = counted_pairs
    common = ["benchmark=hpatches", "model=sift", "model.num_features=1500", f"data_root={tiny_hpatches}",
              "progress=false"]
    run = tmp_path / "run"
    stop_at[0] = 2
    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmark(cfg_for(*common, "resume=true"), run)  # a first start: nothing to resume
    assert len(_journal(run)) == 1 + 1
    with pytest.raises(ValueError, match=r"holds the journals of an interrupted evaluation \(records.rank0.jsonl\): "
                                         r"resume=true continues it"):
        evaluate_benchmark(cfg_for(*common), run)
    assert len(_journal(run)) == 1 + 1  # left as it was
    calls.clear()
    stop_at[0] = None
    full = evaluate_benchmark(cfg_for(*common, "resume=true"), run)
    assert calls == ["v_a/1-3", "v_a/1-4", "v_a/1-5", "v_a/1-6"] and len(_journal(run)) == 1 + 5
    result = json.loads((run / "metrics.json").read_text())
    assert result["resumed"] == {"from": str(run), "num_pairs": 1, "devices": ["cpu"], "versions": [result["versions"]]}
    assert result["versions"]["torch"] == torch.__version__ and "opencv" in result["versions"]
    assert evaluate_benchmark(cfg_for(*common), run) == full  # a finished run may be run again from scratch

    # pair 0 made on another device (edited header); resumed twice: it keeps its device
    lines = (run / "records.rank0.jsonl").read_text().splitlines(keepends=True)
    header = json.loads(lines[0]) | {"device": "cuda:0"}
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "records.rank0.jsonl").write_text(json.dumps(header) + "\n" + lines[1])
    (tmp_path / "gpu" / "records.rank1.jsonl").write_text("")  # a rank that died before its first line: ignored
    evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'gpu'}", "subset=0:2"), tmp_path / "r1")
    evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'r1'}"), tmp_path / "r2")
    evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'r2'}", "subset=2:5"), tmp_path / "r3")
    resumed = {d: json.loads((tmp_path / d / "metrics.json").read_text())["resumed"] for d in ("r1", "r2", "r3")}
    assert resumed["r1"]["devices"] == ["cuda:0"] and resumed["r1"]["num_pairs"] == 1
    assert resumed["r2"]["devices"] == ["cpu", "cuda:0"] and resumed["r2"]["num_pairs"] == 2
    assert resumed["r3"]["devices"] == ["cpu"] and resumed["r3"]["num_pairs"] == 3
    assert _records(tmp_path / "r2") == _records(run)


def test_resume_keeps_failed_pairs_unless_asked_to_retry_them(tiny_hpatches, tmp_path, counted_pairs):
    calls, stop_at = counted_pairs
    common = ["benchmark=hpatches", "model=sift", "model.num_features=1500", f"data_root={tiny_hpatches}",
              "progress=false"]
    full = evaluate_benchmark(cfg_for(*common), tmp_path / "full")
    stop_at[1] = {"v_a/1-3"}
    flaky = evaluate_benchmark(cfg_for(*common), tmp_path / "flaky")
    assert flaky["num_failed"] == 1 and flaky != full
    stop_at[1] = set()
    calls.clear()
    assert evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'flaky'}"), tmp_path / "kept") == flaky
    assert calls == []
    assert evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'flaky'}", "resume_retry_failed=true"),
                              tmp_path / "retried") == full
    assert calls == ["v_a/1-3"] and _records(tmp_path / "retried") == _records(tmp_path / "full")
    assert [r["pair_index"] for r in _journal(tmp_path / "retried")[1:]] == [0, 2, 3, 4, 1]  # the failure not carried
    assert json.loads((tmp_path / "retried" / "metrics.json").read_text())["resumed"]["num_pairs"] == 4


def test_no_run_replaces_an_interrupted_runs_journals_and_carried_records_keep_their_versions(
        tiny_hpatches, tmp_path, counted_pairs, caplog):
    calls, stop_at = counted_pairs
    common = ["benchmark=hpatches", "model=sift", "model.num_features=1500", f"data_root={tiny_hpatches}",
              "progress=false"]
    d = tmp_path / "d"
    full = evaluate_benchmark(cfg_for(*common), d)
    calls.clear()
    stop_at[0] = 2  # a finished run's directory, run again and interrupted: its old outputs are gone
    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmark(cfg_for(*common, "model.num_features=100"), d)
    assert not any((d / n).exists() for n in ("metrics.json", "records.json", "pairs.csv"))
    stop_at[0] = None
    for overrides in ([], [f"resume={tmp_path / 'elsewhere'}"], [f"merge=[{tmp_path / 'elsewhere'}]"]):
        with pytest.raises(ValueError, match="holds the journals of an interrupted evaluation"):
            evaluate_benchmark(cfg_for(*common, *overrides), d)
    assert _journal(d)[0]["identity"]["model"]["num_features"] == 100  # untouched

    # resume=true on a first start resumes nothing (metrics.json as a plain run's); merged runs' precision
    # and values compared as values (3 = 3.0; SIFT has no dtype to differ in)
    assert evaluate_benchmark(cfg_for(*common, "resume=true", "shard=0/2"), tmp_path / "s0") != full
    assert json.loads((tmp_path / "s0" / "metrics.json").read_text())["resumed"] is None
    evaluate_benchmark(cfg_for(*common, "shard=1/2", "benchmark.ransac_thr=3", "dtype=float16"), tmp_path / "s1")
    assert evaluate_benchmark(cfg_for(*common, f"merge=[{tmp_path / 's0'},{tmp_path / 's1'}]"), tmp_path / "m") == full

    # a record's versions travel with it through a chain of resumes
    lines = (tmp_path / "s0" / "records.rank0.jsonl").read_text().splitlines(keepends=True)
    old = json.loads(lines[0])
    old["versions"] = old["versions"] | {"torch": "1.0-old"}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "records.rank0.jsonl").write_text(json.dumps(old) + "\n" + "".join(lines[1:]))
    evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'a'}", "subset=0:4"), tmp_path / "b")
    assert "were made with other software versions" in caplog.text
    caplog.clear()
    evaluate_benchmark(cfg_for(*common, f"resume={tmp_path / 'b'}"), tmp_path / "c")
    resumed = json.loads((tmp_path / "c" / "metrics.json").read_text())["resumed"]
    assert sorted(v["torch"] for v in resumed["versions"]) == sorted(["1.0-old", torch.__version__])
    assert resumed["num_pairs"] == 5 and "were made with other software versions" in caplog.text
    assert _records(tmp_path / "c") == _records(tmp_path / "m")  # = the uninterrupted run's


def test_software_versions_are_plain_strings_that_safe_yaml_reads_back():
    """(torch.__version__ is a TorchVersion: the hparams.yaml of logger=csv/tensorboard wrote it as a
    Python object that yaml.safe_load and Lightning's load_hparams_from_yaml refuse.)"""
    import yaml

    from dkm.utils.versions import software_versions

    versions = software_versions()
    assert "torch" in sys.modules and versions["torch"] == torch.__version__
    assert all(v is None or type(v) is str for v in versions.values())
    assert yaml.safe_load(yaml.dump({"versions": versions})) == {"versions": versions}


def test_git_commit_is_that_of_the_checkout_tracking_the_package(tmp_path, monkeypatch):
    import subprocess

    from dkm.utils.versions import git_commit

    def git(repo, *args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

    repo, pkg = tmp_path / "repo", tmp_path / "repo" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    git(repo, "init", "-q")
    assert git_commit(pkg) is None  # no commit yet
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "x")
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(pkg) == sha
    (pkg / "new.py").write_text("")  # untracked files count
    assert git_commit(pkg) == sha + "+dirty"
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "nowhere"))  # the environment's git variables are not used
    assert git_commit(pkg) == sha + "+dirty"
    other = tmp_path / "repo" / "untracked_pkg"  # a package copied, untracked, into some other checkout
    other.mkdir()
    (other / "__init__.py").write_text("")
    assert git_commit(other) is None
    assert git_commit(tmp_path / "plain" / "pkg") is None  # not a checkout
