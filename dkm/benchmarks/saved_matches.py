"""Sparse matches saved by one evaluation and scored again by another, without the matcher.

``evaluate.py save_matches=true`` writes, for every pair it matches, the sampled matches the protocol
estimated from: ``<run dir>/matches/<pair index>.npz`` with ``matches`` (N, 4) (normalized
``[x1, y1, x2, y2]``, as the matcher returned them), ``certainty`` (N,), ``pair_id`` and ``identity``
(the run's identity, JSON). ``evaluate.py matches_from=<run dir>`` (or a list of shard runs) scores
those matches with this command's estimator settings (RANSAC threshold, estimator, repeats, pixel
centre, ...): a threshold sweep costs RANSAC only. The settings that decide the matches
(:data:`MATCHING_KEYS`) must be the saved run's; each pair is seeded by its index as always, so with
the saved run's own settings the records are that run's (tested).
"""
from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..evaluation_journal import canonical
from ..utils.files import atomic_write

#: the directory of a run that holds its saved matches
MATCHES_DIR = "matches"
#: protocol keys that decide which matches a pair gets (the others decide what is estimated from them)
MATCHING_KEYS = ("num_samples", "cycle_consistency", "resolution", "upsample_preds", "upsample_res")


def matches_file(run_dir, pair_index: int) -> Path:
    """``<run_dir>/matches/<pair_index>.npz`` (zero-padded to 6 digits: listed in pair order)."""
    return Path(run_dir) / MATCHES_DIR / f"{int(pair_index):06d}.npz"


def save_matches(run_dir, pair_index: int, pair_id: str, matches: np.ndarray, certainty: np.ndarray,
                 identity_json: str) -> None:
    """Write one pair's matches ``(N, 4)`` and certainties ``(N,)`` atomically (a killed run leaves no
    partial file)."""
    buf = io.BytesIO()
    np.savez(buf, matches=np.asarray(matches), certainty=np.asarray(certainty), pair_id=np.array(pair_id),
             identity=np.array(identity_json))
    atomic_write(matches_file(run_dir, pair_index), lambda f: f.write(buf.getvalue()))


def remove_saved_matches(run_dir, keep) -> None:
    """Remove the saved matches in ``run_dir`` of every pair not in ``keep`` (a run starting there
    clears an earlier run's, so that a file exists only where this run matched the pair)."""
    keep = {int(i) for i in keep}
    for f in (Path(run_dir) / MATCHES_DIR).glob("*.npz"):
        if not (f.stem.isdigit() and int(f.stem) in keep):
            f.unlink()


def copy_saved_matches(src_dir, dst_dir, indices) -> list[int]:
    """Copy the saved matches of ``indices`` from run ``src_dir`` into run ``dst_dir`` (a resumed run
    keeps the matches of the pairs it carries over); returns the indices ``src_dir`` has none for."""
    missing = []
    for i in indices:
        src, dst = matches_file(src_dir, i), matches_file(dst_dir, i)
        if not src.is_file():
            missing.append(i)
        elif src.resolve() != dst.resolve():
            atomic_write(dst, lambda f, src=src: f.write(src.read_bytes()))
    return missing


class SavedMatches:
    """A "matcher" that returns the matches saved by earlier runs (``run_dirs``, e.g. the shards of
    one evaluation) for a pair index.

    Args:
        run_dirs: finished runs of ``evaluate.py save_matches=true``.
        identity: the identity those runs recorded (every file must carry it: a file of a run of
            another model, protocol or seed is refused).
        records: ``{run dir: its records}`` (``records.json``); a pair's record, and its file, are
            those of the first run that recorded it.
    """

    def __init__(self, identity: Mapping, records: Mapping):
        self.run_dirs = [Path(d) for d in records]
        self.identity = canonical(identity)
        self.records, self.sources = {}, {}
        for d, recs in records.items():
            for r in recs:
                i = int(r["pair_index"])
                if i not in self.records:
                    self.records[i], self.sources[i] = r, Path(d)

    def file_for(self, pair_index: int) -> Path | None:
        """The saved file of ``pair_index`` (in the run whose record is used), else ``None``: that run
        did not match the pair (a failure before matching) or did not save its matches."""
        d = self.sources.get(pair_index)
        f = None if d is None else matches_file(d, pair_index)
        return f if f is not None and f.is_file() else None

    def unusable(self, indices) -> tuple[list[int], list[int]]:
        """Of ``indices``: those the runs did not evaluate, and those they matched without saving the
        matches (a run without ``save_matches=true``, or files removed since)."""
        unrecorded = [i for i in indices if i not in self.records]
        unsaved = [i for i in indices if i in self.records and not self.records[i].get("failed")
                   and self.file_for(i) is None]
        return unrecorded, unsaved

    def _read(self, f: Path) -> tuple[str, np.ndarray, np.ndarray]:
        """``(pair_id, matches, certainty)`` of a saved file; ``ValueError`` naming it if it is not one or
        was saved by a run of another identity (e.g. left there by another evaluation)."""
        try:
            with np.load(f, allow_pickle=False) as z:
                saved_id, identity = str(z["pair_id"]), str(z["identity"])
                matches, certainty = z["matches"], z["certainty"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{f}: not a saved-matches file with matches, certainty, pair_id, identity ({e})") from e
        if canonical(json.loads(identity)) != self.identity:
            raise ValueError(f"{f} was saved by a run of another model, protocol or seed than the one whose "
                             f"metrics.json is in {f.parent.parent}: evaluate that run again")
        return saved_id, matches, certainty

    def check_identity(self, pair_index: int) -> None:
        """Refuse (``ValueError``) a file of a run of another identity: called on the first pair before
        any is scored, so that a directory of another run's files is refused at start."""
        f = self.file_for(pair_index)
        if f is not None:
            try:
                self._read(f)
            except ValueError as e:
                raise ValueError(f"matches_from: {e}") from None

    def saved_matches(self, pair_index: int, pair_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(matches (N, 4), certainty (N,))`` of a pair; raises if it has none (the saved run failed
        it before matching: that run's reason is given) or if the file is of another pair or run."""
        f = self.file_for(pair_index)
        if f is None:
            rec = self.records.get(pair_index, {})
            raise RuntimeError(f"no saved matches for pair {pair_index} in {self.sources.get(pair_index)}: "
                               f"the saved run failed it ({rec.get('reason') or 'no reason recorded'})")
        saved_id, matches, certainty = self._read(f)
        if saved_id != pair_id:
            raise ValueError(f"{f} holds pair {saved_id!r}, this dataset lists {pair_id!r} at index {pair_index}")
        return matches, certainty
