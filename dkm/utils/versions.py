"""The software a run was made with, recorded next to its results."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

#: (name in the record, import name, distribution names to ask when it is not imported)
PACKAGES = (("torch", "torch", ("torch",)), ("torchvision", "torchvision", ("torchvision",)),
            ("opencv", "cv2", ("opencv-python-headless", "opencv-python", "opencv-contrib-python")),
            ("poselib", "poselib", ("poselib",)), ("kornia", "kornia", ("kornia",)), ("numpy", "numpy", ("numpy",)))


def _version(module: str, dists: tuple[str, ...]) -> str | None:
    """The imported module's ``__version__`` (with local tags such as ``+cu130``), else the installed
    distribution's; nothing is imported here. A plain ``str`` (torch's is a ``TorchVersion``, which YAML
    dumps of the logged hyperparameters would write as a Python object that safe loaders refuse)."""
    if module in sys.modules:
        version = getattr(sys.modules[module], "__version__", None)
        return None if version is None else str(version)
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except Exception:  # not installed, or broken metadata
            continue
    return None


def git_commit(package_dir: Path) -> str | None:
    """The commit of the checkout that ``package_dir`` is tracked in (``+dirty`` with changes to it,
    untracked files included), ``None`` outside a checkout or where git cannot tell."""
    repo = package_dir.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, env=env)

    try:
        if not (repo / ".git").exists():
            return None
        top = git("rev-parse", "--show-toplevel")
        tracked = git("ls-files", "--error-unmatch", str(package_dir / "__init__.py"))
        sha = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", str(package_dir))
    except (OSError, subprocess.SubprocessError):
        return None
    if (top.returncode or tracked.returncode or sha.returncode or status.returncode
            or Path(top.stdout.strip()).resolve() != repo.resolve()
            or not re.fullmatch(r"[0-9a-f]{40}", sha.stdout.strip())):
        return None
    return sha.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def software_versions() -> dict:
    """The versions that can change a result: dkm (and its git commit in a checkout), torch,
    torchvision, OpenCV, poselib, kornia, numpy (``None`` where not installed)."""
    from .. import __version__

    versions = {"dkm": __version__, "dkm_git": git_commit(Path(__file__).resolve().parents[1])}
    return versions | {name: _version(module, dists) for name, module, dists in PACKAGES}
