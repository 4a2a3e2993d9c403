"""What the dense benchmarks share: a pair's predicted warp scored by its end-point error (EPE) and
the percentage of correct keypoints (PCK@t px) against a ground-truth warp of the same query points.

A pair's record holds ``num_gt`` (query points with ground truth), its ``epe`` and ``pck@t`` (fractions)
over those points. Metrics are means over the pairs, PCK in percent. A failed pair scores PCK 0 and is
left out of the EPE mean (``num_failed``); a pair without any ground-truth point cannot be scored and
is counted in ``num_without_gt``.
"""
from __future__ import annotations

import numpy as np
import torch


class DenseWarpScoring:
    """Mixin for :class:`~dkm.benchmarks.base.PairBenchmark` subclasses that score a dense warp; they
    set ``self.pck_thresholds`` (px) and call :meth:`dense_warp` and :meth:`error_record` in their
    ``evaluate_pair``."""

    pck_thresholds: list[float]

    def check_model(self, model) -> None:
        if hasattr(model, "match_sparse") or not hasattr(model, "match"):
            raise TypeError(f"{self.name}: scores a dense warp; {type(model).__name__} is not a dense matcher")
        super().check_model(model)

    def model_settings(self) -> dict:
        # one direction: of a symmetric DKMv3 match only its query -> support half would be scored, which
        # is the one-directional match (the release's scripts set model.symmetric = False); half the work
        return super().model_settings() | {"symmetric": False}

    def dense_warp(self, model, im_query, im_support) -> torch.Tensor:
        """``model.match(im_query, im_support)`` (one direction: ``symmetric`` is off while a dense
        benchmark runs) as a float64 CPU tensor ``(h, w, 4)`` = ``[x_q, y_q, x_s, y_s]`` (normalized)
        on the matcher's output grid."""
        dense, _ = model.match(im_query, im_support, check_cycle_consistency=self.cycle_consistency)
        dense = torch.as_tensor(dense).detach().cpu().double()
        if dense.dim() != 3 or dense.shape[-1] != 4:
            raise ValueError(f"the matcher returned a warp of shape {tuple(dense.shape)}; expected (h, w, 4)")
        if not torch.isfinite(dense).all():
            raise ValueError("the matcher returned a warp with NaN/inf coordinates")
        return dense

    def error_record(self, err: torch.Tensor) -> dict:
        """A pair's record from the end-point errors ``(N,)`` (px) of its query points with ground truth."""
        n = int(err.numel())
        rec = {"num_gt": n, "epe": float(err.mean()) if n else float("nan")}
        rec |= {f"pck@{t:g}": float((err < t).double().mean()) if n else float("nan") for t in self.pck_thresholds}
        return rec

    def failure_record(self, pair):
        return {"num_gt": -1, "epe": float("nan")} | {f"pck@{t:g}": 0.0 for t in self.pck_thresholds}

    @staticmethod
    def scored(records: list[dict]) -> list[dict]:
        """The records that enter the means: failed pairs and pairs with ground truth."""
        return [r for r in records if r["failed"] or r["num_gt"] > 0]

    def compute_metrics(self, records):
        scored = self.scored(records)
        ok = [r for r in scored if not r["failed"]]
        out = {f"pck@{t:g}": 100 * float(np.mean([r[f"pck@{t:g}"] for r in scored])) if scored else float("nan")
               for t in self.pck_thresholds}
        out["epe"] = float(np.mean([r["epe"] for r in ok])) if ok else float("nan")
        out["num_pairs"] = len(records)
        out["num_failed"] = sum(bool(r["failed"]) for r in records)
        out["num_without_gt"] = len(records) - len(scored)
        return out
