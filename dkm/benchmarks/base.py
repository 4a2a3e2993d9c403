"""One code path for every benchmark: pairs -> per-pair records -> metrics.

``evaluate_pairs(model, indices)`` evaluates any subset of pair indices into records (one dict per
pair, with ``pair_index``, ``pair_id``, ``failed``, ``reason``, ``seconds`` and the protocol's
errors); ``compute_metrics(records)`` reduces any list of records. ``evaluate.py``, the Python API
(``benchmark(model)``) and the distributed validation callbacks all go through these two, so a
pair evaluated on any rank gives the same record: its randomness (match sampling, RANSAC) is seeded
by ``(seed, pair_index)``, never by the order of evaluation.

A pair that fails (unreadable image, too few matches, estimator failure, any exception) is
recorded with ``failed=True`` and a reason, and scored as the protocol scores a failure; metrics count
them (``num_failed``). Running out of memory is retried once with the allocator's cache emptied
before it counts as a failure; a device error (``torch.AcceleratorError``, which leaves the device
unusable) and a failure to write an output (:class:`OutputError`) are raised.
"""
from __future__ import annotations

import gc
import logging
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from ..geometry.coords import normalized_to_pixel

log = logging.getLogger(__name__)


class OutputError(RuntimeError):
    """The run could not write one of its outputs (e.g. a pair's saved matches on a full disk): raised
    out of the run, never recorded as the pair's failure (that would change the metrics)."""


@contextmanager
def overridden(obj, **attrs):
    """Set ``attrs`` on ``obj`` for the duration of the block, then restore the old values."""
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield obj
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


class PairBenchmark(ABC):
    """Base class: subclasses list their pairs and evaluate one pair.

    Args:
        data_root: root of the dataset in its public on-disk layout.
        seed: base seed; pair ``i`` uses ``(seed, i)``.
        num_samples: sparse matches sampled from the dense prediction.
        cycle_consistency: ``match(..., check_cycle_consistency=...)``.
        center: pixel coordinate of pixel 0's centre used when converting matches to pixels
            (see :mod:`dkm.geometry.coords`); protocols differ.
        limit: evaluate only the first ``limit`` pairs (quick checks).
        resolution: ``(h, w)`` internal resolution a dense DKM matcher runs at during this
            benchmark (set on its ``h_resized``/``w_resized`` and restored afterwards); ``None`` =
            the model's own. Ignored for matchers without those attributes (SIFT).
        upsample_preds, upsample_res: the DKMv3 upsampling pass during this benchmark (set on the
            model's attributes of the same names and restored afterwards): ``upsample_preds`` True /
            False turns it on / off, ``upsample_res`` ``(H, W)`` is its resolution; ``None`` = the
            model's own setting. Ignored for matchers without those attributes.
    """

    name = "benchmark"
    #: whether the protocol scores sparse matches (:meth:`sparse_matches`), which an evaluation can
    #: save and another score again (:mod:`.saved_matches`); the dense protocols score the warp itself
    sparse_matching = False

    def __init__(self, data_root, *, seed: int = 0, num_samples: int = 10000, cycle_consistency: bool = False,
                 center: float = 0.5, limit: int | None = None, check: bool = True, resolution=None,
                 upsample_preds: bool | None = None, upsample_res=None, index: bool = True):
        self.data_root = Path(data_root)
        self.resolution = self._size_or_none(resolution, "resolution")
        self.upsample_res = self._size_or_none(upsample_res, "upsample_res")
        self.upsample_preds = None if upsample_preds is None else bool(upsample_preds)
        if self.upsample_preds and self.upsample_res is None:
            raise ValueError(f"{self.name}: upsample_preds=true needs upsample_res=[H, W]")
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        self.cycle_consistency = bool(cycle_consistency)
        self.center = float(center)
        self._pairs, self.num_listed = [], 0
        self.last_records: list[dict] = []
        if limit is not None and (isinstance(limit, bool) or int(limit) != limit or int(limit) < 1):
            raise ValueError(f"limit={limit!r}: expected a positive number of pairs (or None: all of them)")
        if not index:  # the protocol only (compute_metrics on records evaluated elsewhere): no dataset read
            return
        if check:
            self.check()
        self._pairs = self.list_pairs()
        self.num_listed = len(self._pairs)
        if not self._pairs:
            raise ValueError(f"{self.name}: no pairs under {self.data_root} with this protocol's selection "
                             "(sequences, scene names, ...)")
        if limit is not None:
            self._pairs = self._pairs[: int(limit)]

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def required_paths(self) -> list[Path]:
        """Files/folders that must exist before any pair is read."""

    @abstractmethod
    def list_pairs(self) -> list:
        """Pair descriptors (anything picklable), in the protocol's order."""

    @abstractmethod
    def evaluate_pair(self, model, pair, ctx: dict) -> dict:
        """Evaluate one pair; may raise. ``ctx`` holds ``generator`` (torch) and ``rng`` (numpy)."""

    @abstractmethod
    def failure_record(self, pair) -> dict:
        """The protocol's score for a pair that failed."""

    @abstractmethod
    def compute_metrics(self, records: list[dict]) -> dict:
        """Reduce records (one per pair) to metrics."""

    def pair_id(self, pair) -> str:
        return str(pair)

    def pair_images(self, pair):
        """The two PIL images of a pair (for logging)."""
        raise NotImplementedError

    def check_pair(self, pair) -> None:
        """Read what evaluating ``pair`` reads from disk (at least its images); raise if anything is
        missing or unreadable (``python -m dkm.benchmarks.check``)."""
        self.pair_images(pair)  # (dkm.utils.image.load_image reads the pixels; its errors name the file)

    def completeness_warnings(self) -> list[str]:
        """How this tree differs from the published benchmark in ways its index files cannot show
        (e.g. HPatches' pairs come from the sequences found on disk); empty when it does not."""
        return []

    # ------------------------------------------------------------------ shared machinery
    def check(self) -> None:
        missing = [str(p) for p in self.required_paths() if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.name}: dataset root {self.data_root} is incomplete; missing:\n  " + "\n  ".join(missing)
                + "\nSee datasets/README.md for the expected layout and download scripts."
            )

    def __len__(self) -> int:
        return len(self._pairs)

    def pairs(self) -> list:
        return list(self._pairs)

    def sparse_matches(self, model, im1, im2, ctx: dict) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 4)`` normalized matches and ``(N,)`` certainties from a dense matcher
        (``match`` + ``sample``), a sparse one (``match_sparse``) or matches saved by an earlier run
        (:class:`.saved_matches.SavedMatches`); handed to ``ctx["on_matches"]`` if set (saving them)."""
        if hasattr(model, "saved_matches"):
            m, c = model.saved_matches(ctx["pair_index"], ctx["pair_id"])
        elif hasattr(model, "match_sparse"):
            m, c = model.match_sparse(im1, im2)
        else:
            dense, cert = model.match(im1, im2, check_cycle_consistency=self.cycle_consistency)
            m, c = model.sample(dense, cert, self.num_samples, generator=ctx["generator"])
        m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        c = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
        if m.ndim != 2 or m.shape[1] != 4:
            raise ValueError(f"the matcher returned matches of shape {m.shape}; expected (N, 4)")
        if not np.isfinite(m).all():
            raise ValueError(f"the matcher returned {int((~np.isfinite(m)).any(axis=1).sum())} of {len(m)} "
                             "matches with NaN/inf coordinates (e.g. an overflow in reduced precision)")
        if ctx.get("on_matches") is not None:
            try:
                ctx["on_matches"](ctx["pair_index"], ctx["pair_id"], m, c)
            except Exception as e:
                raise OutputError(f"{self.name}: saving the matches of pair {ctx['pair_index']} "
                                  f"({ctx['pair_id']}) failed: {type(e).__name__}: {e}") from e
        return m.astype(np.float64), c

    def to_pixels(self, matches: np.ndarray, hw1, hw2, center: float | None = None):
        """Normalized ``(N, 4)`` matches -> pixel keypoints in each image."""
        c = self.center if center is None else center
        return (normalized_to_pixel(matches[:, :2], hw1[0], hw1[1], c),
                normalized_to_pixel(matches[:, 2:], hw2[0], hw2[1], c))

    def _size_or_none(self, size, key: str):
        if size is None:
            return None
        size = tuple(int(v) for v in size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"{self.name}: {key} must be [h, w] (positive), got {size}")
        return size

    def model_settings(self) -> dict:
        """Model attributes this benchmark sets while it runs (only those it specifies)."""
        out = {}
        if self.resolution is not None:
            out["h_resized"], out["w_resized"] = self.resolution
        if self.upsample_preds is not None:
            out["upsample_preds"] = self.upsample_preds
        if self.upsample_res is not None:
            out["upsample_res"] = self.upsample_res
        return out

    def effective_resolution(self, model):
        """``(h, w)`` at which ``model`` matches in this benchmark, or ``None`` (not a dense DKM matcher)."""
        if not (hasattr(model, "h_resized") and hasattr(model, "w_resized")):
            return None
        return self.resolution or (int(model.h_resized), int(model.w_resized))

    def effective_upsample_res(self, model):
        """``(H, W)`` of the upsampling pass ``model`` runs in this benchmark, or ``None`` (no such pass)."""
        if not hasattr(model, "upsample_preds"):
            return None
        on = model.upsample_preds if self.upsample_preds is None else self.upsample_preds
        res = self.upsample_res or getattr(model, "upsample_res", None)
        return tuple(int(v) for v in res) if on and res is not None else None

    def model_settings_applied(self, model):
        """Apply :meth:`model_settings` to the attributes ``model`` has; restore them afterwards."""
        return overridden(model, **{k: v for k, v in self.model_settings().items() if hasattr(model, k)})

    def check_model(self, model) -> None:
        """Raise if this protocol cannot evaluate ``model`` at all (else every pair would fail and be
        scored as a failure); called by :meth:`evaluate_pairs` and, before training starts, by the
        validation callbacks."""
        if self.cycle_consistency and getattr(model, "version", None) == "v3":
            raise ValueError(f"{self.name}: this protocol matches with cycle consistency (the DKM v11 option), "
                             "which DKMv3 models do not have (they match both directions); use the DKMv3 "
                             f"protocol (evaluate.py benchmark={self.name}_dkmv3; as a training callback "
                             f"benchmark@callbacks.{self.name}.benchmark={self.name}_dkmv3; from Python "
                             f"dkm.evaluation.build_benchmark({self.name + '_dkmv3'!r}, root)), or "
                             "cycle_consistency=false")

    def evaluate_pairs(self, model, indices=None, progress: bool = True,
                       on_record: Callable[[dict], None] | None = None,
                       on_matches: Callable | None = None) -> list[dict]:
        """Records for the given pair indices (default: all), each seeded by its index, so any
        subset, order or split over processes gives the same record for a pair. ``on_record(record)``
        is called as each pair is scored (``evaluate.py`` journals them there), ``on_matches(pair_index,
        pair_id, matches, certainty)`` as a sparse protocol has a pair's matches (``save_matches``)."""
        indices = range(len(self._pairs)) if indices is None else [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self._pairs)]
        if bad:
            raise IndexError(f"{self.name}: pair indices {bad[:10]} out of range [0, {len(self._pairs)})")
        self.check_model(model)
        with self.model_settings_applied(model):
            return self._evaluate(model, indices, progress, on_record, on_matches)

    def _seeded_context(self, i: int) -> dict:
        """The randomness of pair ``i``, seeded by ``(seed, i)`` (also OpenCV's global RNG, which its
        RANSAC draws from): ``generator`` (torch, CPU), ``rng`` (numpy), ``seed``."""
        cv2.setRNGSeed(self.seed * 1_000_003 + i)
        return {"generator": torch.Generator().manual_seed(self.seed * 1_000_003 + i),
                "rng": np.random.default_rng([self.seed, i]), "seed": (self.seed, i)}

    def _evaluate(self, model, indices, progress: bool, on_record=None, on_matches=None) -> list[dict]:
        records = []
        for i in tqdm(indices, desc=self.name, disable=not progress, leave=False):
            pair = self._pairs[i]
            known = {"pair_index": i, "pair_id": self.pair_id(pair), "on_matches": on_matches}
            t0 = time.perf_counter()
            try:
                try:
                    rec = {"failed": False, "reason": ""} | self.evaluate_pair(model, pair, self._seeded_context(i) | known)
                except torch.OutOfMemoryError as e:  # e.g. memory cached by training next to a validation loop:
                    log.warning("%s: pair %d (%s) ran out of memory (%s); retrying once with the allocator's "
                                "cache emptied", self.name, i, self.pair_id(pair), str(e).splitlines()[0])
                    del e
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    rec = {"failed": False, "reason": ""} | self.evaluate_pair(model, pair, self._seeded_context(i) | known)
            except (torch.AcceleratorError, OutputError):  # a device error spoils every later pair; a lost output
                raise
            except Exception as e:  # recorded and scored, never fatal
                log.warning("%s: pair %d (%s) failed: %s", self.name, i, self.pair_id(pair), e)
                log.debug("%s", traceback.format_exc())
                rec = self.failure_record(pair) | {"failed": True, "reason": f"{type(e).__name__}: {e}"}
            rec = {"pair_index": i, "pair_id": self.pair_id(pair)} | rec
            rec["seconds"] = time.perf_counter() - t0
            records.append(rec)
            if on_record is not None:
                on_record(rec)
        return records

    def run(self, model, indices=None, progress: bool = True) -> tuple[dict, list[dict]]:
        """Evaluate and reduce: ``(metrics, records)``."""
        records = self.evaluate_pairs(model, indices, progress)
        self.last_records = records
        return self.compute_metrics(records), records

    def benchmark(self, model, model_name: str | None = None) -> dict:
        """All pairs -> metrics (the original Python entry point; ``model_name``, which DKMv3's
        ``benchmark(model, model_name)`` took and did not use, is accepted and ignored)."""
        return self.run(model)[0]


def dedup_records(records: list[dict]) -> list[dict]:
    """One record per ``pair_index`` (first kept), sorted."""
    seen: dict = {}
    for r in records:
        seen.setdefault(r["pair_index"], r)
    return [seen[k] for k in sorted(seen)]
