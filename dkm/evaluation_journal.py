"""The records of an evaluation as they are made, so that an interrupted run can be resumed.

Every process of ``evaluate.py`` appends each pair's record, the moment it is scored, as one JSON
line to ``records.rank<k>.jsonl`` in the run directory (flushed and fsync'ed: a killed process loses
at most the line it was writing). The first line is the run's identity: what decides a record
(benchmark, protocol, seed, model config, checkpoint sha256, precision). ``resume=<run dir>`` reads
that directory's journals, refuses them if their identity differs from the command's, and evaluates
only the pairs without a record; since every pair is seeded by its index, the resumed run's records
and metrics are those of an uninterrupted one.

    {"identity": {...}, "device": "cuda:0", "rank": 0, "world": 4}
    {"pair_index": 0, "pair_id": "...", "failed": false, ...}
    ...
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .utils.files import atomic_write_text

log = logging.getLogger(__name__)

JOURNAL_GLOB = "records.rank*.jsonl"


def journal_path(run_dir, rank: int) -> Path:
    """``<run_dir>/records.rank<rank>.jsonl``."""
    return Path(run_dir) / f"records.rank{rank}.jsonl"


def _line(obj, default: Callable) -> str:
    return json.dumps(obj, default=default, allow_nan=True) + "\n"


class RecordJournal:
    """An open journal: ``write(record)`` appends one line and syncs it to disk.

    Args:
        path: the journal file (replaced: written anew with ``header`` and ``records`` first).
        header: the first line, ``{"identity": ..., ...}``.
        records: records carried over from a resumed run, written after the header.
        default: JSON encoder for values ``json`` does not know (numpy scalars, arrays).
    """

    def __init__(self, path, header: Mapping, records: Iterable[dict] = (), default: Callable = str):
        self.path, self._default, self.num_written = Path(path), default, 0
        atomic_write_text(self.path, "".join(_line(obj, default) for obj in [dict(header), *records]))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(_line(record, self._default))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.num_written += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_journal(path: Path) -> tuple[dict, list[dict]]:
    """``(header, records)`` of one journal; a torn last line (the process died writing it) is left out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    objs = []
    for n, line in enumerate(lines, 1):
        try:
            objs.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                log.warning("resume: %s: its last line is incomplete (the run stopped while writing it); that "
                            "pair is evaluated again", path)
                break
            raise ValueError(f"resume: {path}, line {n}, is not a JSON record ({e}); this file is not a journal "
                             "of evaluate.py, or was edited") from e
    if not objs or not isinstance(objs[0], dict) or "identity" not in objs[0]:
        raise ValueError(f"resume: {path} does not start with the run's identity line ({{\"identity\": ...}})")
    bad = next((n for n, r in enumerate(objs[1:], 2) if not isinstance(r, dict) or "pair_index" not in r), None)
    if bad is not None:
        raise ValueError(f"resume: {path}, line {bad}, is not a pair record (no 'pair_index')")
    return objs[0], objs[1:]


def read_journals(run_dir, identity: Mapping) -> tuple[list[dict], list[str]]:
    """The records in ``run_dir``'s journals (one per pair index, sorted) and the devices that made them.

    Raises:
        FileNotFoundError: ``run_dir`` has no journal.
        ValueError: a journal's identity differs from ``identity`` (the differing keys are named), or a
            journal is not one.
    """
    paths = sorted(Path(run_dir).glob(JOURNAL_GLOB))
    if not paths:
        raise FileNotFoundError(f"resume: no {JOURNAL_GLOB} in {run_dir} (every evaluate.py run writes them as it "
                                "goes; runs made by merge= have none)")
    want = {k: json.dumps(v, sort_keys=True, default=str) for k, v in identity.items()}
    records: dict[int, dict] = {}
    devices: list[str] = []
    for path in paths:
        header, recs = _read_journal(path)
        have = {k: json.dumps(v, sort_keys=True, default=str) for k, v in dict(header["identity"]).items()}
        differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if differ:
            raise ValueError(f"resume: {path} was written by a run that differs from this command in {differ} "
                             f"(there: {[json.loads(have[k]) if k in have else None for k in differ]}; here: "
                             f"{[json.loads(want[k]) if k in want else None for k in differ]}); resume with that "
                             "run's settings, or start a new run")
        devices.append(str(header.get("device")))
        for r in recs:
            records.setdefault(int(r["pair_index"]), r)
    return [records[k] for k in sorted(records)], sorted(set(devices))
