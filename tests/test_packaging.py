"""The installed package: a wheel carries the Hydra configs (as ``dkm/conf``), so that the protocols can
be built by name, ``build_benchmark("scannet_dkmv3", root)``, without a checkout of this repository."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

from dkm.evaluation import benchmark_config, build_benchmark, config_dir
from synthetic_benchmarks import make_hpatches

REPO = Path(__file__).resolve().parents[1]


def test_the_package_list_is_complete():
    """pyproject.toml lists the packages explicitly (to map conf/ to dkm.conf): a new subpackage must be added."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(tool["packages"]) == sorted(find_packages(str(REPO), include=["dkm", "dkm.*"]) + ["dkm.conf"])
    assert tool["package-dir"] == {"dkm.conf": "conf"}
    deepest = max(len(p.relative_to(REPO / "conf").parts) for p in (REPO / "conf").rglob("*.yaml"))
    assert deepest == 2 and tool["package-data"]["dkm.conf"] == ["*.yaml", "*/*.yaml"]  # the globs reach them all


def test_benchmarks_by_config_name(tmp_path):
    assert config_dir() == REPO / "conf"
    assert benchmark_config("scannet_dkmv3")["num_samples"] == 5000
    bench = build_benchmark("scannet_dkmv3", tmp_path, index=False)
    assert (bench.num_samples, bench.threshold_px, bench.ransac_repeats) == (5000, 0.5, 5)
    with pytest.raises(ValueError, match=r"no benchmark config 'scannet_v3' .* expected one of \[.*'scannet_dkmv3'"):
        build_benchmark("scannet_v3", tmp_path)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """A wheel built from a copy of the sources, installed into a folder of its own: that folder
    (``dkm/``, and the console scripts in ``bin/``)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    src = tmp_path / "src"  # (a copy: building in the checkout would leave build/ and egg-info there)
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("dkm", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "w")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "w").glob("dkm-*.whl"))
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    return tmp_path / "site"


def _outside_the_checkout(site: Path) -> dict:
    """The environment of a process that imports dkm from ``site`` only (not this checkout)."""
    return {"PYTHONPATH": str(site), "PATH": f"{site / 'bin'}:/usr/bin:/bin", "HOME": str(site.parent)}


def test_a_wheel_installs_the_configs(installed_wheel, tmp_path):
    """From elsewhere, build a DKMv3 protocol by name from the installed configs."""
    site = installed_wheel
    installed = sorted(str(p.relative_to(site / "dkm" / "conf")) for p in (site / "dkm" / "conf").rglob("*.yaml"))
    assert installed == sorted(str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml"))
    probe = ("import json, dkm; from dkm.evaluation import build_benchmark, config_dir; "
             f"b = build_benchmark('megadepth1500_dkmv3', {str(tmp_path)!r}, index=False); "
             "print(json.dumps([dkm.__file__, str(config_dir()), list(b.resolution), b.num_samples]))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=_outside_the_checkout(site))
    assert run.returncode == 0, run.stderr[-2000:]
    file, conf, resolution, num_samples = json.loads(run.stdout.strip().splitlines()[-1])
    assert file == str(site / "dkm" / "__init__.py") and conf == str(site / "dkm" / "conf")
    assert resolution == benchmark_config("megadepth1500_dkmv3")["resolution"] and num_samples == 5000


def test_the_console_scripts_run_from_a_wheel(installed_wheel, tmp_path):
    """``dkm-evaluate`` (= evaluate.py) evaluates SIFT on a generated HPatches tree and ``dkm-train``
    (= train.py) composes the quickstart, both from the installed configs in a folder without a
    checkout; outputs go below the working directory, the log file is named after the program."""
    site = installed_wheel
    make_hpatches(tmp_path / "hp", hw=(240, 320))
    env = _outside_the_checkout(site)
    run = subprocess.run([str(site / "bin" / "dkm-evaluate"), "benchmark=hpatches", "model=sift",
                          f"data_root={tmp_path / 'hp'}", "limit=2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "evaluate" / "hpatches").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["metrics"]["num_pairs"] == 2 and metrics["metrics"]["num_failed"] == 0
    assert metrics["versions"]["dkm_git"] is None  # the installed copy, not this checkout's
    assert (run_dir / "evaluate.log").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()

    cfg = subprocess.run([str(site / "bin" / "dkm-train"), "experiment=quickstart", "trainer.max_steps=7", "--cfg", "job"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    assert "arch: dkm_small" in cfg.stdout and "max_steps: 7" in cfg.stdout
