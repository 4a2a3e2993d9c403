"""evaluate.py save_matches=true / matches_from=<run>: the sampled matches of one evaluation scored
again with other estimator settings, without the matcher (dkm/benchmarks/saved_matches.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from dkm.benchmarks.saved_matches import matches_file
from dkm.evaluation import config_dir, evaluate_benchmark
from synthetic_benchmarks import make_hpatches, make_scannet


def cfg_for(*overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def records_of(run_dir) -> list[dict]:
    """A run's records without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((run_dir / "records.json").read_text())]


@pytest.fixture(scope="module")
def hpatches_tree(tmp_path_factory):
    return make_hpatches(tmp_path_factory.mktemp("hp"), seqs=("v_a",), hw=(240, 320), seed=3)


def test_saved_matches_reproduce_the_run_and_score_other_thresholds(hpatches_tree, tmp_path):
    common = ["benchmark=hpatches", "model=sift", "model.num_features=800", f"data_root={hpatches_tree}",
              "progress=false"]
    source = tmp_path / "source"
    evaluate_benchmark(cfg_for(*common, "save_matches=true"), source)
    files = sorted((source / "matches").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.npz" for i in range(5)]
    with np.load(files[2]) as z:
        assert str(z["pair_id"]) == "v_a/1-4" and z["matches"].shape[1] == 4 and len(z["certainty"]) == len(z["matches"])
        assert json.loads(str(z["identity"]))["model"]["arch"] == "sift"
    # the saved run's own protocol: its records, to the last digit
    replay = tmp_path / "replay"
    assert evaluate_benchmark(cfg_for(*common, f"matches_from={source}"), replay) == \
        json.loads((source / "metrics.json").read_text())["metrics"]
    assert records_of(replay) == records_of(source)
    meta = json.loads((replay / "metrics.json").read_text())
    assert meta["matches_from"] == [str(source)] and meta["model"]["arch"] == "saved_matches"
    assert meta["model"]["source"]["model"]["num_features"] == 800 and meta["device"] == "cpu"
    # another RANSAC threshold: what a run of the matcher with that threshold gives
    tight = ["benchmark.ransac_thr=0.2", "benchmark.center=0.0"]
    evaluate_benchmark(cfg_for(*common, *tight), tmp_path / "direct")
    evaluate_benchmark(cfg_for(*common, *tight, f"matches_from={source}"), tmp_path / "swept")
    assert records_of(tmp_path / "swept") == records_of(tmp_path / "direct") != records_of(source)
    # the shards of one evaluation together, and a subset of the saved pairs
    for k in range(2):
        evaluate_benchmark(cfg_for(*common, "save_matches=true", f"shard={k}/2"), tmp_path / f"s{k}")
    evaluate_benchmark(cfg_for(*common, f"matches_from=[{tmp_path / 's0'},{tmp_path / 's1'}]"), tmp_path / "shards")
    assert records_of(tmp_path / "shards") == records_of(source)
    evaluate_benchmark(cfg_for(*common, f"matches_from={tmp_path / 's1'}", "subset=[1,3]"), tmp_path / "sub")
    assert records_of(tmp_path / "sub") == [records_of(source)[i] for i in (1, 3)]
    # a run resumed from another directory keeps the matches of the pairs it carries over
    evaluate_benchmark(cfg_for(*common, "save_matches=true", f"resume={tmp_path / 's1'}"), tmp_path / "resumed")
    assert sorted(f.name for f in (tmp_path / "resumed" / "matches").iterdir()) == [f.name for f in files]
    evaluate_benchmark(cfg_for(*common, f"matches_from={tmp_path / 'resumed'}"), tmp_path / "replay2")
    assert records_of(tmp_path / "replay2") == records_of(source)


def test_matches_from_refuses_what_it_cannot_score(hpatches_tree, tmp_path):
    common = ["benchmark=hpatches", "model=sift", "model.num_features=500", f"data_root={hpatches_tree}",
              "progress=false"]
    source = tmp_path / "source"
    evaluate_benchmark(cfg_for(*common, "save_matches=true", "subset=[0,1,2]"), source)
    with pytest.raises(ValueError, match=r"made with \{'num_samples': 20000\}, this command gives \{'num_samples': 999\}"):
        evaluate_benchmark(cfg_for(*common, "benchmark.num_samples=999", f"matches_from={source}", "subset=[0]"),
                           tmp_path / "a")
    with pytest.raises(ValueError, match=r"2 of the 5 selected pairs were not evaluated .* \(first: \[3, 4\]\)"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={source}", "subset=[0,1,2,3,4]"), tmp_path / "b")
    # without a selection of its own it takes the saved run's (as merge= does)
    evaluate_benchmark(cfg_for(*common, f"matches_from={source}"), tmp_path / "b2")
    assert [r["pair_index"] for r in records_of(tmp_path / "b2")] == [0, 1, 2]
    assert json.loads((tmp_path / "b2" / "metrics.json").read_text())["subset"] == [0, 1, 2]
    evaluate_benchmark(cfg_for(*common, "subset=[0]"), tmp_path / "unsaved")
    with pytest.raises(ValueError, match=r"1 of the 1 selected pairs have no saved matches .*save_matches=true"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={tmp_path / 'unsaved'}", "subset=[0]"), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"matches_from: .*nowhere/metrics.json not found"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={tmp_path / 'nowhere'}"), tmp_path / "d")
    with pytest.raises(ValueError, match="merge= and matches_from= together"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={source}", f"merge=[{source}]"), tmp_path / "e")
    with pytest.raises(ValueError, match="matches_from= with save_matches=true"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={source}", "save_matches=true"), tmp_path / "f")
    with pytest.raises(ValueError, match=r"drawn with seed=0, this command gives seed=2 .*give seed=0"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={source}", "subset=[0]", "seed=2"), tmp_path / "f2")
    with pytest.raises(ValueError, match=r"ckpt=.*x.pth is not the checkpoint that made the saved matches"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={source}", f"ckpt={tmp_path / 'x.pth'}"), tmp_path / "f3")
    with pytest.raises(ValueError, match="into its own directory would replace the saved run's outputs"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={source}", "subset=[0]"), source)
    assert (source / "metrics.json").exists() and len(list((source / "matches").iterdir())) == 3
    for key in ("save_matches=true", f"matches_from={source}"):
        with pytest.raises(ValueError, match="hpatches_dense scores the dense warp, not sparse matches"):
            evaluate_benchmark(cfg_for("benchmark=hpatches_dense", "model=sift", f"data_root={hpatches_tree}", key),
                               tmp_path / "g")
    # a file left in the directory by a run of another seed is refused, not scored as this run's
    other = tmp_path / "other_seed"
    evaluate_benchmark(cfg_for(*common, "save_matches=true", "subset=[1]", "seed=3"), other)
    shutil.copy(matches_file(other, 1), matches_file(source, 1))
    evaluate_benchmark(cfg_for(*common, f"matches_from={source}", "subset=[0,1]"), tmp_path / "h")
    rec = records_of(tmp_path / "h")
    assert not rec[0]["failed"] and rec[1]["failed"] and "another model, protocol or seed" in rec[1]["reason"]
    with pytest.raises(ValueError, match=r"matches_from: .*000001.npz was saved by a run of another model"):
        evaluate_benchmark(cfg_for(*common, f"matches_from={source}", "subset=[1]"), tmp_path / "h2")  # at start
    # a pair the saved run failed before matching fails again, with that run's reason
    records = json.loads((source / "records.json").read_text())
    records[2] |= {"failed": True, "reason": "OSError: unreadable image"}
    (source / "records.json").write_text(json.dumps(records))
    matches_file(source, 2).unlink()
    evaluate_benchmark(cfg_for(*common, f"matches_from={source}", "subset=[2]"), tmp_path / "i")
    (rec,) = records_of(tmp_path / "i")
    assert rec["failed"] and "the saved run failed it (OSError: unreadable image)" in rec["reason"]


def test_saved_matches_are_those_of_the_run_and_a_lost_file_stops_it(hpatches_tree, tmp_path):
    """A run into a directory clears the matches an earlier run saved there (a pair that now fails before
    matching has none, so it is not scored from the old file); a file that cannot be written stops the
    run instead of failing its pair (which would change the metrics)."""
    from dkm.benchmarks.base import OutputError

    tree = tmp_path / "tree"
    shutil.copytree(hpatches_tree, tree)
    common = ["benchmark=hpatches", "model=sift", "model.num_features=500", f"data_root={tree}", "progress=false",
              "subset=[0,1,2]"]
    run = tmp_path / "run"
    evaluate_benchmark(cfg_for(*common, "save_matches=true"), run)
    image = tree / "hpatches-sequences-release" / "v_a" / "3.ppm"  # pair 1 is (v_a, 3)
    good = image.read_bytes()
    image.write_bytes(b"not an image")
    evaluate_benchmark(cfg_for(*common, "save_matches=true"), run)  # again, into the same directory
    image.write_bytes(good)
    assert not matches_file(run, 1).exists() and matches_file(run, 2).exists()
    evaluate_benchmark(cfg_for(*common, f"matches_from={run}"), tmp_path / "replay")
    saved, replayed = records_of(run), records_of(tmp_path / "replay")
    assert saved[1]["failed"] and replayed[1]["failed"] and saved[1]["reason"] in replayed[1]["reason"]
    assert [replayed[i] for i in (0, 2)] == [saved[i] for i in (0, 2)]

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "matches").write_text("a file where the folder goes")
    with pytest.raises(OutputError, match=r"saving the matches of pair 0 \(v_a/1-2\) failed"):
        evaluate_benchmark(cfg_for(*common, "save_matches=true"), blocked)
    assert not (blocked / "metrics.json").exists()


def test_relative_pose_threshold_sweep_from_a_dkm_models_matches(tmp_path):
    """A DKM model's sampled matches (torch, float32) on the DKMv3 ScanNet protocol (five shuffled
    RANSAC runs per pair): the replay gives the run's records, another threshold a direct run's."""
    from dkm.models.zoo import build_model

    root = make_scannet(tmp_path / "scannet", n_pairs=2, hw=(240, 320))
    torch.manual_seed(0)
    ckpt = tmp_path / "small.pth"
    torch.save(build_model({"arch": "dkm_small", "h": 64, "w": 96, "weights": None, "pretrained": False}).state_dict(),
               ckpt)
    common = ["benchmark=scannet_dkmv3", "model=dkm_small", "model.h=64", "model.w=96", f"ckpt={ckpt}",
              f"data_root={root}", "benchmark.resolution=[64,96]", "benchmark.num_samples=400", "device=cpu",
              "progress=false"]
    evaluate_benchmark(cfg_for(*common, "save_matches=true"), tmp_path / "source")
    with np.load(matches_file(tmp_path / "source", 0)) as z:
        assert z["matches"].dtype == np.float32 and len(z["matches"]) == 400
    evaluate_benchmark(cfg_for(*common, f"matches_from={tmp_path / 'source'}"), tmp_path / "replay")
    assert records_of(tmp_path / "replay") == records_of(tmp_path / "source")
    meta = json.loads((tmp_path / "replay" / "metrics.json").read_text())
    src = json.loads((tmp_path / "source" / "metrics.json").read_text())
    assert meta["checkpoint_sha256"] == src["checkpoint_sha256"] and meta["protocol"]["effective_resolution"] == [64, 96]
    assert meta["model"]["source"]["model"]["arch"] == "dkm_small"
    evaluate_benchmark(cfg_for(*common, "benchmark.threshold_px=2.0"), tmp_path / "direct")
    evaluate_benchmark(cfg_for(*common, "benchmark.threshold_px=2.0", f"matches_from={tmp_path / 'source'}"),
                       tmp_path / "swept")
    assert records_of(tmp_path / "swept") == records_of(tmp_path / "direct") != records_of(tmp_path / "source")
