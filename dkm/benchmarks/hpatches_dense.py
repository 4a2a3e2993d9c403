"""Dense HPatches benchmark: the end-point error and PCK of the predicted warp against the
ground-truth homography, on the viewpoint sequences (``HpatchesDenseBenchmark`` of the DKM release,
``dkm/benchmarks/hpatches_dense_benchmark.py`` at Parskatt/DKM HEAD, returned as ``hp_aepe``,
``hp_pck1/3/5``)."""
from __future__ import annotations

import numpy as np
import torch

from ..geometry.coords import normalized_to_pixel
from .dense import DenseWarpScoring
from .base import overridden
from .hpatches import HpatchesSequences


class HpatchesDenseBenchmark(DenseWarpScoring, HpatchesSequences):
    """Dense warp accuracy on the pairs ``(1, k)`` of the HPatches sequences.

    Protocol of the release (values in ``conf/benchmark/hpatches_dense.yaml``): the viewpoint
    sequences (``sequences="v"``); each pair matched with image ``k`` as the query and image 1 as the
    support, ``model.match(im_k, im_1)`` at the model's resolution (``resolution`` to set one); both
    ends of every predicted match converted to pixels with ``center`` (0.0: HPatches' integer pixel
    centres, the frame of ``H_1_k``; the release subtracted 0.5 from ``u = W (x + 1) / 2``); the
    query point mapped into image 1 by ``inv(H_1_k)``; the error of a match is its distance to that
    point, in pixels of image 1, over the query points that land strictly inside
    ``(0, w1 - 1) x (0, h1 - 1)``; ``hp240`` rescales the error's x and y by ``240 / w_k`` and
    ``240 / h_k`` (the release's switch, named after the 240 x 240 evaluation of GLU-Net; it scales
    by the *query* image's size, although the error is in image 1). Scored as
    :mod:`dkm.benchmarks.dense` says; ``compute_metrics`` adds the EPE per image index ``k``
    (``epe_1-k``, the columns GLU-Net's tables report as I-V).
    """

    name = "hpatches_dense"

    def __init__(self, data_root="data/hpatches", *, sequences: str = "v", exclude_sequences=(),
                 center: float = 0.0, pck_thresholds=(1, 3, 5), hp240: bool = False, **kw):
        self.pck_thresholds = [float(t) for t in pck_thresholds]
        self.hp240 = bool(hp240)
        kw.setdefault("num_samples", 0)  # dense: nothing is sampled
        super().__init__(data_root, sequences=sequences, exclude_sequences=exclude_sequences, center=center, **kw)

    def pair_images(self, pair):
        """``(image k, image 1)``: the query and the support, in the order they are matched."""
        im1, im_k = super().pair_images(pair)
        return im_k, im1

    def evaluate_pair(self, model, pair, ctx):
        im_k, im1 = self.pair_images(pair)
        (wk, hk), (w1, h1) = im_k.size, im1.size
        H_k_to_1 = torch.linalg.inv(torch.from_numpy(self._gt(pair)))
        dense = self.dense_warp(model, im_k, im1).reshape(-1, 4)
        query = normalized_to_pixel(dense[:, :2], hk, wk, self.center)
        pred = normalized_to_pixel(dense[:, 2:], h1, w1, self.center)
        proj = torch.cat((query, torch.ones_like(query[:, :1])), dim=1) @ H_k_to_1.T
        gt = proj[:, :2] / proj[:, 2:]
        inside = (gt[:, 0] > 0) & (gt[:, 0] < w1 - 1) & (gt[:, 1] > 0) & (gt[:, 1] < h1 - 1)
        residual = pred - gt
        if self.hp240:
            residual = residual * torch.tensor([240.0 / wk, 240.0 / hk], dtype=residual.dtype)
        return self.error_record(residual[inside].norm(dim=-1)) | {"k": pair[1]}

    def failure_record(self, pair):
        return super().failure_record(pair) | {"k": pair[1]}

    def benchmark(self, model, ransac_thr: float | None = None, hp240: bool | None = None) -> dict:
        """All pairs -> metrics, with the release's signature ``benchmark(model, ransac_thr=3.,
        hp240=False)``: ``hp240`` overrides the constructor's for this call; ``ransac_thr`` is accepted
        and unused (no estimator runs here, nor did the release use it)."""
        with overridden(self, hp240=self.hp240 if hp240 is None else bool(hp240)):
            return self.run(model)[0]

    def compute_metrics(self, records):
        out = super().compute_metrics(records)
        for k in range(2, 7):
            epes = [r["epe"] for r in self.scored(records) if not r["failed"] and int(r["k"]) == k]
            out[f"epe_1-{k}"] = float(np.mean(epes)) if epes else float("nan")
        return out
