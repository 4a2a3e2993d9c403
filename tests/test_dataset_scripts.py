"""The preparation scripts of ``datasets/`` on trees in the layouts of the public releases (generated,
tiny): each arranges its benchmark's root and ends with ``python -m dkm.benchmarks.check`` passing;
bad arguments stop it with a message naming them. The downloads are not exercised (no network in
tests): a file already at its destination is kept by ``fetch``, which is how the pair lists are
provided here."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from synthetic_benchmarks import make_megadepth1500, make_scannet, make_yfcc

REPO = Path(__file__).resolve().parents[1]
HW = (48, 64)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the dataset scripts are bash scripts")


def run_script(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """``bash datasets/<name> args...`` in ``cwd`` with this interpreter first on PATH (the scripts call
    ``python -m dkm.benchmarks.check``)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(REPO / "datasets" / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_scannet1500_prepare_links_the_scenes_and_copies_the_pair_list(tmp_path):
    # LoFTR's archive extracted somewhere: the scene folders a few levels down, test.npz beside them
    extracted = make_scannet(tmp_path / "download" / "scannet_test_1500", hw=HW)
    root = tmp_path / "data" / "scannet"
    res = run_script("scannet1500/prepare.sh", root, tmp_path / "download", extracted / "test.npz", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "3 pairs listed, 0 problems" in res.stdout
    assert (root / "scans_test").is_symlink() and (root / "scans_test" / "scene0707_00" / "color").is_dir()
    assert (root / "test.npz").read_bytes() == (extracted / "test.npz").read_bytes()
    # run again (e.g. after an interruption): nothing to redo, still passes
    again = run_script("scannet1500/prepare.sh", root, tmp_path / "download", extracted / "test.npz", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("case", ["missing directory", "no scenes", "missing pair list"])
def test_scannet1500_prepare_names_what_is_wrong(tmp_path, case):
    (tmp_path / "empty").mkdir()
    make_scannet(tmp_path / "ok", n_pairs=1, hw=HW)
    args, expected = {
        "missing directory": ((tmp_path / "nowhere",), f"no such directory: {tmp_path / 'nowhere'}"),
        "no scenes": ((tmp_path / "empty",), f"no scene0707_00/ under {tmp_path / 'empty'}"),
        "missing pair list": ((tmp_path / "ok", tmp_path / "no.npz"), f"no such file: {tmp_path / 'no.npz'}"),
    }[case]
    res = run_script("scannet1500/prepare.sh", tmp_path / "data", *args, cwd=tmp_path)
    assert res.returncode != 0 and expected in res.stderr, res.stderr


def test_megadepth1500_prepare_unpacks_the_two_scenes_from_the_archive(tmp_path):
    src = make_megadepth1500(tmp_path / "src", hw=HW)
    root = tmp_path / "data" / "megadepth"
    root.mkdir(parents=True)
    for f in src.glob("*.npz"):  # the five LoFTR scene-info files, as if already downloaded
        shutil.copy(f, root / f.name)
    archive = tmp_path / "megadepth_test_1500.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src / "Undistorted_SfM", arcname="megadepth_test_1500/Undistorted_SfM")
    res = run_script("megadepth1500/prepare.sh", root, archive, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "5 pairs listed, 0 problems" in res.stdout
    assert sorted(p.name for p in (root / "Undistorted_SfM").iterdir()) == ["0015", "0022"]
    assert not (root / ".extract").exists()  # the temporary extraction is removed


def test_megadepth1500_prepare_refuses_an_archive_without_a_scene(tmp_path):
    src = make_megadepth1500(tmp_path / "src", hw=HW)
    shutil.rmtree(src / "Undistorted_SfM" / "0022")
    archive = tmp_path / "partial.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src / "Undistorted_SfM", arcname="Undistorted_SfM")
    root = tmp_path / "data"
    root.mkdir()
    for f in src.glob("*.npz"):
        shutil.copy(f, root / f.name)
    res = run_script("megadepth1500/prepare.sh", root, archive, cwd=tmp_path)
    assert res.returncode != 0 and f"no Undistorted_SfM/0022/ inside {archive}" in res.stderr, res.stderr
    assert not (root / ".extract").exists()


def test_yfcc100m_prepare_links_a_users_raw_data_and_never_moves_it(tmp_path):
    raw = make_yfcc(tmp_path / "raw_data", pairs_per_scene=1, hw=HW)
    root = tmp_path / "data" / "yfcc100m_test"
    root.mkdir(parents=True)
    shutil.copy(raw / "yfcc_test_pairs_with_gt.txt", root)  # SuperGlue's pair list, as if downloaded
    res = run_script("yfcc100m/prepare.sh", root, raw, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "4 pairs listed, 0 problems" in res.stdout
    for d in ("yfcc100m", "pairs"):
        assert (root / d).is_symlink() and (root / d).resolve() == (raw / d).resolve()
        assert (raw / d).is_dir()  # the user's copy stays where it was


def test_yfcc100m_prepare_refuses_a_directory_that_is_not_oanets_raw_data(tmp_path):
    (tmp_path / "raw").mkdir()
    res = run_script("yfcc100m/prepare.sh", tmp_path / "data", tmp_path / "raw", cwd=tmp_path)
    assert res.returncode != 0 and f"no yfcc100m/ in {tmp_path / 'raw'} (expected OANet's raw_data)" in res.stderr
