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


def test_a_wheel_installs_the_configs(tmp_path):
    """Build a wheel from a copy of the sources, install it into a folder of its own and, from elsewhere,
    build a DKMv3 protocol by name from the installed configs."""
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
    installed = sorted(str(p.relative_to(tmp_path / "site" / "dkm" / "conf"))
                       for p in (tmp_path / "site" / "dkm" / "conf").rglob("*.yaml"))
    assert installed == sorted(str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml"))
    probe = ("import json, dkm; from dkm.evaluation import build_benchmark, config_dir; "
             f"b = build_benchmark('megadepth1500_dkmv3', {str(tmp_path)!r}, index=False); "
             "print(json.dumps([dkm.__file__, str(config_dir()), list(b.resolution), b.num_samples]))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    file, conf, resolution, num_samples = json.loads(run.stdout.strip().splitlines()[-1])
    assert file == str(tmp_path / "site" / "dkm" / "__init__.py") and conf == str(tmp_path / "site" / "dkm" / "conf")
    assert resolution == benchmark_config("megadepth1500_dkmv3")["resolution"] and num_samples == 5000
