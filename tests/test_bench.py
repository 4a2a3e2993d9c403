"""bench/match_speed.py and bench/train_step.py run end to end on tiny configurations (their numbers are
for humans; here only that they run, compare the variants and report what they promise)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_match_speed_bench_runs_and_reports_every_column():
    cmd = [sys.executable, str(REPO / "bench" / "match_speed.py"), "--arch", "dkm_small", "--h", "64", "--w", "96",
           "--repeats", "1", "--rounds", "2", "--variants", "faithful", "fast", "--batches", "1", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "match() on dkm_small at 64x96" in out and "bfloat16" in out and "x 2 round(s)" in out
    rows = {}
    for m in re.finditer(r"^(faithful|fast) +\d.*$", out, re.M):
        rows.setdefault(m.group(1), m.group(0).split())  # the main table comes first
    assert set(rows) == {"faithful", "fast"}, out
    faithful, fast = rows["faithful"], rows["fast"]
    assert faithful[3] == "1.00x" and fast[3].endswith("x") and float(fast[3][:-1]) > 0
    # the fast path's deviation from the faithful one, measured on the same pair
    # columns: variant, s/match, faults, vs, peak MiB, vs, match MiB, vs, max dflow, p99 dflow, max dcert
    assert faithful[5] == faithful[7] == "1.00x" and float(fast[6]) >= 0 and fast[7].endswith("x")
    assert float(faithful[8]) == 0.0 and float(faithful[10]) == 0.0
    assert float(fast[8]) < 0.5 and float(fast[10]) < 1e-2, out
    assert "B=2" in out and "importing torch+dkm alone" in out and "what the match itself adds" in out
    floor = re.search(r"against faithful: (\d+) MiB .* = ([\d.]+)x its peak", out)
    assert floor and 0 < float(floor.group(2)) <= 1.0, out  # import + weights never exceed a process's peak


FAKE_RELEASE = '''
import torch

URL = "https://github.com/Parskatt/storage/releases/download/dkm/dkm_base_v11.pth"


def dkm_base(pretrained=True, version="v11"):
    """Stands in for the release: downloads its weights and hard-codes CUDA, as the release does."""
    return FakeRelease(torch.hub.load_state_dict_from_url(URL))


class FakeRelease:
    h_resized, w_resized = 384, 512

    def __init__(self, state_dict):
        assert "encoder.resnet.conv1.weight" in state_dict

    def match(self, im1, im2, check_cycle_consistency=False):
        if check_cycle_consistency:
            raise RuntimeError("fake release: no cycle consistency")
        h, w = self.h_resized, self.w_resized
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device="cuda:0")
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device="cuda:0")
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).cuda()
        return torch.cat((grid, grid), dim=-1), torch.ones(h, w).cuda()
'''


def test_match_speed_bench_runs_the_release_code_on_the_bench_device(tmp_path):
    """--release-code: the release's CUDA calls and weight download are redirected to the bench's device
    and synthetic weights (a stand-in checkout with the release's layout: the real one is not fetched in
    tests), its results join the table, and a release variant that fails is reported, not fatal."""
    models = tmp_path / "DKM" / "dkm" / "models"
    models.mkdir(parents=True)
    (models.parent / "__init__.py").write_text("")
    (models / "__init__.py").write_text("")
    (models / "build_model.py").write_text(FAKE_RELEASE)
    cmd = [sys.executable, str(REPO / "bench" / "match_speed.py"), "--arch", "dkm_base", "--h", "32", "--w", "48",
           "--repeats", "1", "--variants", "faithful", "faithful_cc", "--release-code", str(tmp_path / "DKM")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    release = re.search(r"^release +(\d\S*) .*$", out, re.M)
    assert release and float(release.group(1)) >= 0 and len(release.group(0).split()) == 11, out
    # the stand-in returns the identity warp at the requested 32x48 grid: its deviation from the faithful path
    # is that path's flow itself, i.e. finite and non-zero
    assert 0 < float(release.group(0).split()[8]) < 100, out
    assert re.search(r"^release_cc +failed: RuntimeError: fake release: no cycle consistency$", out, re.M), out
    # the footer compares the variants of the same kind (not faithful_cc) with the release
    assert re.search(r"^against the release's own code \(release: [\d.]+ s/match, peak \d+ MiB\): "
                     r"faithful [\d.]+x the speed, [\d.]+x memory$", out, re.M), out


def test_match_speed_bench_rejects_a_directory_without_the_release_layout(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "match_speed.py"), "--release-code", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no dkm/models/build_model.py" in res.stderr and "988ccbc" in res.stderr


def test_train_step_bench_compares_layouts_on_the_same_batches():
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), "--h", "64", "--w", "96", "--batch", "2",
           "--steps", "1", "--warmup", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = {m.group(1): m.group(0).split() for m in re.finditer(r"^(nchw|channels_last) +\d.*$", res.stdout, re.M)}
    assert set(rows) == {"nchw", "channels_last"}, res.stdout
    # columns: variant, s/step, pairs/s, speed-up, loss at step 1
    assert rows["nchw"][3] == "1.00x" and float(rows["channels_last"][3][:-1]) > 0
    assert float(rows["nchw"][2]) == pytest.approx(2 / float(rows["nchw"][1]), rel=0.02)
    # same seed, same batch: the two layouts compute the same first loss up to rounding
    assert float(rows["channels_last"][4]) == pytest.approx(float(rows["nchw"][4]), rel=1e-4)
