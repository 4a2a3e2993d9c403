"""Shared pytest fixtures: where the read-only ``../shared`` folder lives, with clean skips."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DKM_SHARED_DIR", REPO_ROOT.parent / "shared"))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set DKM_SHARED_DIR to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``shared/fixtures``: key lists and numerical parity fixtures of the original release."""
    return _require(SHARED / "fixtures", "parity fixtures folder")


@pytest.fixture(scope="session")
def realdata_dir() -> Path:
    """``shared/realdata``: small real image sets with ground truth."""
    return _require(SHARED / "realdata", "real data folder")


def load_npz(fixtures_dir: Path, name: str) -> dict:
    """A fixture archive from ``shared/fixtures`` as a dict; skips the test if it is absent."""
    import numpy as np

    path = _require(fixtures_dir / name, f"fixture {name}")
    return dict(np.load(path))


def state_dict_signature(model) -> list:
    """``[name, shape, dtype]`` of every state_dict entry in order: the format of the fixtures' key lists."""
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def assert_weight_sums(state_dict: dict, ref: dict) -> None:
    """Synthetic weights match the fixture's per-tensor float64 sums (``weight_keys``/``weight_sums``)."""
    sums = dict(zip(ref["weight_keys"], ref["weight_sums"]))
    bad = [k for k in sums if abs(float(state_dict[k].double().sum()) - sums[k]) > 1e-6 * max(1.0, abs(sums[k]))]
    assert not bad, f"weight sums differ from the fixture for {bad[:5]}"


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
