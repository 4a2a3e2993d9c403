"""Reading the index files of the public releases as plain dicts of arrays.

They come in three containers under similar names: ``.npz`` zip archives (ScanNet-1500's
``test.npz``, DKM's ``mega_8_scenes_*.npz``), ``.npy`` files holding one pickled dict (DKM's
``prep_scene_info/*.npy``) and plain pickles of a dict named ``.npz`` (LoFTR's MegaDepth-1500
``megadepth_test_1500_scene_info/*.npz``). ``np.load`` returns a different type for each.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def load_arrays(path: str | Path, allow_pickle: bool = False) -> dict:
    """The arrays of ``path`` as a dict (the file is closed on return), whichever of the three
    containers it is. ``allow_pickle`` is needed for object arrays and pickled dicts. Raises
    ``ValueError`` naming the file if it holds something other than a mapping."""
    try:
        obj = np.load(path, allow_pickle=allow_pickle)
        if isinstance(obj, np.lib.npyio.NpzFile):
            with obj:
                return {k: obj[k] for k in obj.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or foreign files: zipfile, pickle, numpy format errors
        raise ValueError(f"{path}: could not be read as an .npz archive, .npy file or pickled dict "
                         f"({type(e).__name__}: {e}); re-download or re-prepare it") from e
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()  # np.save of a dict
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected arrays by name (an .npz archive or a pickled dict), "
                         f"got {type(obj).__name__}")
    return dict(obj)
