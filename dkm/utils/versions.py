"""The software a run was made with, recorded next to its results."""
from __future__ import annotations

import importlib
import subprocess
from pathlib import Path


def software_versions() -> dict:
    """The versions that can change a record: dkm (and its git commit, ``+dirty`` with uncommitted
    changes, in a checkout), torch, torchvision, OpenCV, poselib, kornia, numpy."""
    from .. import __version__

    versions = {"dkm": __version__, "dkm_git": None}
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        try:
            sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--", "dkm"],
                                   capture_output=True, timeout=10).returncode != 0
            versions["dkm_git"] = (sha + ("+dirty" if dirty else "")) or None
        except (OSError, subprocess.SubprocessError):
            pass
    for name, module in (("torch", "torch"), ("torchvision", "torchvision"), ("opencv", "cv2"),
                         ("poselib", "poselib"), ("kornia", "kornia"), ("numpy", "numpy")):
        try:
            versions[name] = getattr(importlib.import_module(module), "__version__", None)
        except ImportError:
            versions[name] = None
    return versions
