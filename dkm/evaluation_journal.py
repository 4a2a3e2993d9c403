"""The records of an evaluation as they are made, so that an interrupted run can be resumed.

Every process of ``evaluate.py`` appends each pair's record, the moment it is scored, as one JSON
line to ``records.rank<k>.jsonl`` in the run directory (flushed and fsync'ed: a killed process loses
at most the line it was writing). The first line is the header: the run's identity (what decides a
record: benchmark, protocol, seed, model config, checkpoint sha256, precision), the device, the
software versions, and where the records carried over from a resumed run were made. ``resume=`` reads a
directory's journals, refuses them if their identity differs from the command's, and evaluates only
the pairs without a record; since every pair is seeded by its index, the resumed run's records and
metrics are those of an uninterrupted one.

    {"identity": {...}, "device": "cuda:0", "rank": 0, "world": 4, "versions": {...}, "carried": []}
    {"pair_index": 0, "pair_id": "...", "failed": false, ...}
    ...
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .utils.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)

JOURNAL_NAME = re.compile(r"records\.rank(\d+)\.jsonl")


def journal_path(run_dir, rank: int) -> Path:
    """``<run_dir>/records.rank<rank>.jsonl``."""
    return Path(run_dir) / f"records.rank{rank}.jsonl"


def journals_in(run_dir) -> list[Path]:
    """The journals in ``run_dir`` (exactly ``records.rank<k>.jsonl``), by rank."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("records.rank*.jsonl")
             if (m := JOURNAL_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _line(obj, default: Callable) -> str:
    return json.dumps(obj, default=default, allow_nan=True) + "\n"


class RecordJournal:
    """An open journal: ``write(record)`` appends one line and syncs it to disk.

    Args:
        path: the journal file (replaced, durably: written anew with ``header`` and ``records`` first).
        header: the first line, ``{"identity": ..., "device": ..., ...}``.
        records: records carried over from a resumed run, written after the header; ``origins`` maps
            their pair indices to ``{"device", "versions"}`` of the run that made them (kept in the header
            as ``carried``: a list of those with their ``pair_indices``).
        default: JSON encoder for values ``json`` does not know (numpy scalars, arrays).
    """

    def __init__(self, path, header: Mapping, records: Iterable[dict] = (), origins: Mapping[int, dict] | None = None,
                 default: Callable = str):
        self.path, self._default, self.num_written = Path(path), default, 0
        records, groups = list(records), {}
        for r in records:  # records grouped by origin (device and versions)
            origin = (origins or {}).get(r["pair_index"], {"device": None, "versions": None})
            key = json.dumps(origin, sort_keys=True, default=str)
            groups.setdefault(key, dict(origin) | {"pair_indices": []})["pair_indices"].append(r["pair_index"])
        head = dict(header) | {"carried": list(groups.values())}
        text = "".join(_line(obj, default) for obj in [head, *records])
        atomic_write(self.path, lambda f: f.write(text.encode("utf-8")), fsync=True)
        fsync_dir(self.path.parent)
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


def _read_journal(path: Path) -> tuple[dict, list[dict]] | None:
    """``(header, records)`` of one journal, ``None`` for an empty file. A last line without its newline
    (the process died writing it) is left out; any other line that is not a record is an error."""
    text = path.read_text(encoding="utf-8")
    if not text:
        log.warning("resume: %s is empty (the run stopped before its first line); ignored", path)
        return None
    lines = text.splitlines()
    objs = []
    for n, line in enumerate(lines, 1):
        try:
            objs.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                log.warning("resume: %s: its last line is incomplete (the run stopped while writing it); that "
                            "pair is evaluated again", path)
                break
            raise ValueError(f"resume: {path}, line {n}, is not a JSON record ({e}); this file is not a journal "
                             "of evaluate.py, or was edited") from e
    if not objs or not isinstance(objs[0], dict) or not isinstance(objs[0].get("identity"), dict):
        raise ValueError(f"resume: {path} does not start with the run's identity line ({{\"identity\": {{...}}}})")
    bad = next((n for n, r in enumerate(objs[1:], 2)
                if not isinstance(r, dict) or type(r.get("pair_index")) is not int), None)
    if bad is not None:
        raise ValueError(f"resume: {path}, line {bad}, is not a pair record (no integer 'pair_index')")
    return objs[0], objs[1:]


def canonical(value):
    """``value`` with every number as a float (a config's ``3`` and ``3.0`` are one threshold) and
    tuples as lists: what two identities are compared as."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def differences(a, b, prefix: str = "") -> Iterator[str]:
    """The dotted keys at which the canonical forms of mappings ``a`` and ``b`` differ."""
    for k in sorted(set(a) | set(b)):
        x, y, key = a.get(k), b.get(k), f"{prefix}{k}"
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            yield from differences(x, y, key + ".")
        elif x != y:
            yield key


def lookup(d: Mapping, dotted: str):
    """``d[a][b]`` for ``"a.b"`` (``None`` where absent)."""
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None
    return d


def read_journals(run_dir, identity: Mapping) -> tuple[list[dict], dict[int, dict]]:
    """The records in ``run_dir``'s journals (one per pair index, sorted) and the origin of each (by
    pair index): ``{"device", "versions"}`` of the run that made it.

    Raises:
        FileNotFoundError: ``run_dir`` has no journal (an empty one, of a run that stopped before its
            first line, is ignored with a warning).
        ValueError: a journal's identity differs from ``identity`` (the differing keys are named), or a
            file named as a journal is not one.
    """
    paths = journals_in(run_dir)
    if not paths:
        raise FileNotFoundError(f"resume: no journal (records.rank<k>.jsonl) in {run_dir} (every evaluate.py run "
                                "writes them as it goes; runs made by merge= have none)")
    want = canonical(identity)
    records: dict[int, dict] = {}
    origins: dict[int, dict] = {}
    for path in paths:
        read = _read_journal(path)
        if read is None:
            continue
        header, recs = read
        differ = list(differences(want, canonical(header["identity"])))
        if differ:
            raise ValueError(f"resume: {path} was written by a run that differs from this command in {differ} "
                             f"(there: {[lookup(header['identity'], k) for k in differ]}; here: "
                             f"{[lookup(identity, k) for k in differ]}); resume with that run's settings, or start "
                             "a new run")
        own = {"device": header.get("device"), "versions": header.get("versions")}
        carried = {int(i): {"device": g.get("device"), "versions": g.get("versions")}
                   for g in header.get("carried") or [] for i in g.get("pair_indices", [])}
        for r in recs:
            if r["pair_index"] not in records:
                records[r["pair_index"]] = r
                origins[r["pair_index"]] = carried.get(r["pair_index"], own)
    return [records[k] for k in sorted(records)], origins
