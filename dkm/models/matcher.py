"""RegressionMatcher: the DKM model (encoder + decoder) and its user-facing ``match``/``sample``."""
from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.coords import DEFAULT_CENTER, normalized_grid, normalized_to_pixel
from ..utils.device import CPU_FAST_NEEDS, CUDA_FAST_NEEDS, autocast_to, reduced_precision_support
from ..utils.image import check_image_tensor, load_image, normalize, pil_to_tensor, resize_tensor
from .sampling import SAMPLE_MODES, sample_matches

log = logging.getLogger(__name__)

#: what ``match(dtype=...)`` runs in reduced precision (see :meth:`RegressionMatcher.match`)
PRECISION_SCOPES = ("refiners", "network")


def _no_enclosing_autocast(device: torch.device):
    """Switches off an autocast the caller may have entered on ``device``'s type (inner
    ``torch.autocast`` regions, e.g. ``match(dtype=...)``'s, still apply)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to switch off
        return contextlib.nullcontext()


class _SampleMethod:
    """``sample`` works on the class (``RegressionMatcher.sample(m, c, ...)``: proportional sampling,
    as the v11 release) and on an instance (then the instance's ``sample_mode``/``sample_thresh``)."""

    def __init__(self, fn):
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj, objtype=None):
        return functools.wraps(self.fn)(functools.partial(self.fn, obj))


class RegressionMatcher(nn.Module):
    """Dense matcher: ``encoder`` gives feature pyramids, ``decoder`` regresses a dense warp.

    Args:
        encoder: :class:`~dkm.models.encoder.Encoder`.
        decoder: :class:`~dkm.models.decoder.Decoder`.
        h, w: internal resolution at which :meth:`match` runs the network.
        fast: default inference path of :meth:`match`: ``True`` = fast (BatchNorm folded into the
            refiner convs, channels-last refiners, Cholesky GP solve, ``inference_mode``, one decoder
            pass per pair and direction on CPU); ``False`` = faithful to the release, operation for
            operation. Training (``forward`` in train mode) is the same either way.
        inference_batch_size: pairs per network pass in the fast path; ``None`` = 1 on CPU (large
            batches fall out of cache there) and the whole batch on accelerators.
        symmetric: (DKMv3) :meth:`match` predicts both directions and returns them side by side.
        upsample_preds: (DKMv3 outdoor) :meth:`match` re-runs the refiners at strides 8..1 on the
            images resized to ``upsample_res``, starting from the first pass's prediction.
        upsample_res: ``(H, W)`` of that pass (the release: 864 x 1152).
        sample_mode: default mode of :meth:`sample` on this model: ``"proportional"`` (v11),
            ``"threshold"``, ``"threshold_balanced"`` (DKMv3), ...; see :mod:`dkm.models.sampling`.
        sample_thresh: certainty above which a match counts as certain in the threshold modes.
        version: ``"v11"`` or ``"v3"``: which release's :meth:`match` conventions apply.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, h: int = 384, w: int = 512,
                 fast: bool = True, inference_batch_size: int | None = None, *, symmetric: bool = False,
                 upsample_preds: bool = False, upsample_res: tuple[int, int] | None = None,
                 sample_mode: str = "proportional", sample_thresh: float = 0.05, name: str | None = None,
                 version: str = "v11"):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.h_resized = h
        self.w_resized = w
        self.fast = fast
        self.inference_batch_size = inference_batch_size
        self.inference_dtype: torch.dtype | None = None  # default ``dtype`` of match()
        self.inference_precision_scope = "refiners"  # default ``precision_scope`` of match()
        if sample_mode not in SAMPLE_MODES:
            raise ValueError(f"unknown sample_mode {sample_mode!r}; expected one of {SAMPLE_MODES}")
        if upsample_preds and upsample_res is None:
            raise ValueError("upsample_preds=True needs upsample_res=(H, W)")
        self.symmetric = symmetric
        self.upsample_preds = upsample_preds
        self.upsample_res = tuple(upsample_res) if upsample_res is not None else None
        self.sample_mode = sample_mode
        self.sample_thresh = sample_thresh
        self.name = name
        if version not in ("v11", "v3"):
            raise ValueError(f"unknown DKM version {version!r}; expected 'v11' or 'v3'")
        self.version = version  # which release's match() post-processing applies

    # ------------------------------------------------------------------ network
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def extract_backbone_features(self, batch: dict, upsample: bool = False) -> dict:
        """Encode ``cat(query, support)`` in one pass: ``{stride: (2B, C, h, w)}`` (strides up to 8
        only for the upsampling pass, which uses no coarser features)."""
        return self.encoder(torch.cat((batch["query"], batch["support"])), max_stride=8 if upsample else 32)

    @staticmethod
    def _corresps(batch: dict, upsample: bool) -> dict:
        if not upsample:
            return {}
        prev = batch.get("corresps")
        if prev is None:
            raise ValueError('the upsampling pass needs batch["corresps"] = {"dense_flow", "dense_certainty"} '
                             "of a first pass")
        return {"flow": prev["dense_flow"], "certainty": prev["dense_certainty"]}

    def forward(self, batch: dict, upsample: bool = False) -> dict:
        """``batch["query"]``, ``batch["support"]`` (B, 3, H, W) ImageNet-normalized ->
        ``{stride: {"dense_flow": (B, 2, H/s, W/s), "dense_certainty": (B, 1, H/s, W/s)}}``.

        ``upsample`` (DKMv3): the refiners at strides 8, 4, 2, 1 only, starting from
        ``batch["corresps"]`` (a previous pass's ``{"dense_flow", "dense_certainty"}``, any size)."""
        pyramid = self.extract_backbone_features(batch, upsample)
        f_q = {s: f.chunk(2)[0] for s, f in pyramid.items()}
        f_s = {s: f.chunk(2)[1] for s, f in pyramid.items()}
        return self.decoder(f_q, f_s, upsample=upsample, **self._corresps(batch, upsample))

    def forward_symmetric(self, batch: dict, upsample: bool = False) -> dict:
        """Both directions at once: outputs have batch 2B, ``[query->support, support->query]``
        (``batch["corresps"]`` of the upsampling pass has batch 2B in the same order)."""
        pyramid = self.extract_backbone_features(batch, upsample)
        f_s = {s: torch.cat(f.chunk(2)[::-1]) for s, f in pyramid.items()}
        return self.decoder(pyramid, f_s, upsample=upsample, **self._corresps(batch, upsample))

    # ------------------------------------------------------------------ matching
    @staticmethod
    def stable_neighbours(query_coords: torch.Tensor, query_to_support: torch.Tensor, support_to_query: torch.Tensor):
        """Cycle-consistency filter of the release.

        ``query_coords`` (B, 2, h, w), ``query_to_support`` (B, h, w, 2), ``support_to_query``
        (B, 2, h, w), all normalized. Iterates q -> s -> q four times and returns the cycle-mapped
        query points ``q`` (B, 2, h, w), their support points ``qts`` (B, h, w, 2) and the mask of
        stable pixels (B, h, w).
        """
        qts = query_to_support
        q2s = query_to_support.permute(0, 3, 1, 2)
        for _ in range(4):
            prev = qts
            q = F.grid_sample(support_to_query, qts, mode="bilinear", align_corners=False)
            qts = F.grid_sample(q2s, q.permute(0, 2, 3, 1), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        d = (qts - prev).norm(dim=-1)
        qd = (q - query_coords).norm(dim=1)
        return q, qts, (d < 1e-3) & (qd < 5e-3)

    def _prepare(self, im1, im2):
        """Inputs -> (query, support) normalized at the internal resolution, a function giving the
        normalized images at their full resolution or at a given ``(H, W)`` (for
        ``do_pred_in_og_res`` and the upsampling pass) and whether the input was batched."""
        size = (self.h_resized, self.w_resized)
        if isinstance(im1, torch.Tensor) != isinstance(im2, torch.Tensor):
            raise TypeError("im1 and im2 must both be tensors or both be images/paths")
        # images in the weights' precision: float32, or float64 for a model cast with .double()
        dtype = torch.float64 if next(self.parameters()).dtype == torch.float64 else torch.float32
        if isinstance(im1, torch.Tensor):
            batched = im1.dim() == 4
            x1 = check_image_tensor(im1, "im1").to(self.device, dtype)
            x2 = check_image_tensor(im2, "im2").to(self.device, dtype)
            if x1.shape[0] != x2.shape[0]:
                raise ValueError(f"im1 and im2 batch sizes differ: {x1.shape[0]} vs {x2.shape[0]}")
            query, support = normalize(resize_tensor(x1, size)), normalize(resize_tensor(x2, size))
            def full(size=None):
                return (normalize(resize_tensor(x1, size) if size else x1),
                        normalize(resize_tensor(x2, size) if size else x2))
            return query, support, full, batched
        p1, p2 = load_image(im1), load_image(im2)
        query = pil_to_tensor(p1, size)[None].to(self.device, dtype)
        support = pil_to_tensor(p2, size)[None].to(self.device, dtype)
        def full(size=None):  # from the original images (not from the resized ones), as the release
            return (pil_to_tensor(p1, size)[None].to(self.device, dtype),
                    pil_to_tensor(p2, size)[None].to(self.device, dtype))
        return query, support, full, False

    def _encode_fast(self, *images: torch.Tensor, max_stride: int = 32, dtype: torch.dtype | None = None) -> list[dict]:
        """The encoder's pyramids of ``images`` (each (B, 3, H, W)) for the fast path: channels-last
        activations, BatchNorm folded once for all images, ReLU and residual additions fused into the
        convolutions, and each image set through on its own (query and support separately, not as one
        batch of 2B: smaller activations, faster on CPU). ``dtype``: the convolutions' autocast dtype
        (None = float32; stride 1, the image itself, stays float32)."""
        # clone, not .contiguous(): a (1, 3, H, W) view of an HWC image passes is_contiguous(channels_last) but
        # has batch stride 3, which makes PyTorch's layout heuristics (suggest_memory_format) pick NCHW
        # for every activation after it
        with autocast_to(images[0].device, dtype):
            return self.encoder.forward_fused([x.clone(memory_format=torch.channels_last) for x in images],
                                              max_stride=max_stride)

    @staticmethod
    def _coarse_dtype(dtype: torch.dtype | None, scope: str) -> torch.dtype | None:
        """Compute dtype of the encoder, the projections and the embedding decoder for ``match(dtype,
        precision_scope=scope)``: ``dtype`` for ``"network"``, float32 (None) for ``"refiners"``."""
        return dtype if scope == "network" else None

    def _dense_fast(self, query: torch.Tensor, support: torch.Tensor, cycle: bool, dtype=None,
                    scope: str = "refiners"):
        """Fast path of the finest-scale prediction: ``(q2s (B, 2, h, w), certainty logits
        (B, 1, h, w), s2q (B, 2, h, w) or None)``. Pairs go through in micro-batches: per micro-batch
        queries and supports through the encoder side by side (:meth:`_encode_fast`), one decoder
        pass per direction (a batch-2 symmetric pass is several times slower on CPU), each pyramid
        level freed as soon as the last decoder pass is done with it. ``dtype`` applies to the refiners
        and, with ``scope="network"``, also to the encoder, projections and embedding decoder (whose
        stride-16/32 features feed the GP: its exponential kernel amplifies their rounding)."""
        b = query.shape[0]
        step = self.inference_batch_size or (1 if query.device.type == "cpu" else b)
        lowp = {"refine_dtype": dtype, "coarse_dtype": self._coarse_dtype(dtype, scope)}
        outs = []
        for i in range(0, b, step):
            f_q, f_s = self._encode_fast(query[i:i + step], support[i:i + step], dtype=lowp["coarse_dtype"])
            fwd = self.decoder(f_q, f_s, fast=True, consume=not cycle, **lowp)[1]
            bwd = self.decoder(f_s, f_q, fast=True, consume=True, **lowp)[1]["dense_flow"] if cycle else None
            outs.append((fwd["dense_flow"], fwd["dense_certainty"], bwd))
        q2s = torch.cat([o[0] for o in outs])
        cert = torch.cat([o[1] for o in outs])
        s2q = torch.cat([o[2] for o in outs]) if cycle else None
        return q2s, cert, s2q

    def _dense_faithful(self, query: torch.Tensor, support: torch.Tensor, cycle: bool):
        """The release's path, in float32: one batched (symmetric, if ``cycle``) forward pass."""
        batch = {"query": query, "support": support}
        if cycle:
            out = self.forward_symmetric(batch)[1]
            q2s, s2q = out["dense_flow"].chunk(2)
            return q2s, out["dense_certainty"].chunk(2)[0], s2q
        out = self.forward(batch)[1]
        return out["dense_flow"], out["dense_certainty"], None

    def _dense_v3(self, query, support, full, fast: bool, dtype=None, scope: str = "refiners"):
        """DKMv3's passes: ``(flow (D*B, 2, h, w), certainty logits (D*B, 1, h, w), stride-16
        certainty logits (D*B, 1, h16, w16))`` with ``D = 2`` directions ``[q->s; s->q]`` if
        ``symmetric`` (else 1), at the upsampling resolution if ``upsample_preds``."""
        up = self.upsample_preds
        q_up, s_up = full(self.upsample_res) if up else (None, None)
        if not fast:  # the release: one batched (symmetric) pass, then one batched upsampling pass
            fwd = self.forward_symmetric if self.symmetric else self.forward
            out = fwd({"query": query, "support": support})
            cert16 = out[16]["dense_certainty"]
            if up:
                out = fwd({"query": q_up, "support": s_up, "corresps": out[1]}, upsample=True)
            return out[1]["dense_flow"], out[1]["dense_certainty"], cert16
        b = query.shape[0]
        step = self.inference_batch_size or (1 if query.device.type == "cpu" else b)
        lowp = {"refine_dtype": dtype, "coarse_dtype": self._coarse_dtype(dtype, scope)}
        res = []  # per micro-batch and direction: (flow, certainty, cert16)
        for i in range(0, b, step):
            sl = slice(i, i + step)
            f_a, f_b = self._encode_fast(query[sl], support[sl], dtype=lowp["coarse_dtype"])
            dirs = [(f_a, f_b), (f_b, f_a)] if self.symmetric else [(f_a, f_b)]
            firsts = [self.decoder(x, y, fast=True, consume=j == len(dirs) - 1, **lowp)
                      for j, (x, y) in enumerate(dirs)]
            del f_a, f_b, dirs
            if up:
                u_a, u_b = self._encode_fast(q_up[sl], s_up[sl], max_stride=8, dtype=lowp["coarse_dtype"])
                dirs = [(u_a, u_b), (u_b, u_a)] if self.symmetric else [(u_a, u_b)]
                finals = [self.decoder(x, y, fast=True, upsample=True, consume=j == len(dirs) - 1, **lowp,
                                       flow=o[1]["dense_flow"], certainty=o[1]["dense_certainty"])
                          for j, ((x, y), o) in enumerate(zip(dirs, firsts))]
                del u_a, u_b, dirs
            else:
                finals = firsts
            res.append([(f[1]["dense_flow"], f[1]["dense_certainty"], o[16]["dense_certainty"])
                        for f, o in zip(finals, firsts)])
        n_dir = 2 if self.symmetric else 1
        cat = lambda j: torch.cat([r[d][j] for d in range(n_dir) for r in res])  # noqa: E731
        return cat(0), cat(1), cat(2)

    def _match_v3(self, im1, im2, fast: bool, dtype=None, scope: str = "refiners"):
        """DKMv3's match(): see :meth:`match`."""
        query, support, full, is_batched = self._prepare(im1, im2)
        with torch.inference_mode() if fast else torch.no_grad():  # (inference_mode(False) re-enables autograd)
            flow, certainty, cert16 = self._dense_v3(query, support, full, fast, dtype, scope)
        matches, certainty = self._finalize_v3(flow, certainty, cert16)
        if is_batched:
            return matches, certainty
        return matches[0], certainty[0]

    def _finalize_v3(self, flow: torch.Tensor, certainty: torch.Tensor, cert16: torch.Tensor):
        """DKMv3's match() output from the final ``flow`` (D*B, 2, H, W), its ``certainty`` logits
        (D*B, 1, H, W) and the first pass's stride-16 logits ``cert16`` (D*B, 1, h, w):
        ``(matches (B, H, D*W, 4), certainty (B, H, D*W))`` (see :meth:`match`)."""
        hs, ws = flow.shape[-2:]
        b = flow.shape[0] // (2 if self.symmetric else 1)
        # As the release: logit = fine - 0.5 * min(coarse, 0), coarse = the first pass's stride-16 logit
        # resized (note the sign: this raises certainty where the coarse logit is negative).
        low_res = F.interpolate(cert16, size=(hs, ws), mode="bilinear", align_corners=False)
        certainty = (certainty - 0.5 * low_res * (low_res < 0)).sigmoid()
        flow = flow.permute(0, 2, 3, 1)
        outside = (flow.abs() > 1).any(dim=-1)  # predictions outside the other image: certainty 0
        certainty = certainty.masked_fill(outside[:, None], 0.0)[:, 0]
        flow = flow.clamp(-1, 1)
        grid = normalized_grid(hs, ws, device=flow.device, dtype=flow.dtype, batch=b)
        if self.symmetric:
            q2s, s2q = flow.chunk(2)
            matches = torch.cat((torch.cat((grid, q2s), dim=-1), torch.cat((s2q, grid), dim=-1)), dim=2)
            certainty = torch.cat(certainty.chunk(2), dim=2)
        else:
            matches = torch.cat((grid, flow), dim=-1)
        return matches, certainty

    @torch.no_grad()
    def match(self, im1, im2, *args, check_cycle_consistency: bool = False, do_pred_in_og_res: bool = False,
              batched: bool | None = None, fast: bool | None = None, dtype: torch.dtype | None = None,
              precision_scope: str | None = None, device: torch.device | str | None = None):
        """Dense matches from ``im1`` (query) to ``im2`` (support).

        Args:
            im1, im2: paths, PIL images (any mode/size), or float tensors in [0, 1] RGB of shape
                (B, 3, H, W) (or (3, H, W)); any size: they are resized to the internal resolution.
            check_cycle_consistency: run both directions and keep certainty only on cycle-stable
                pixels (others get ``1e-3 * certainty``); the query points become the cycle-mapped ones.
            do_pred_in_og_res: refine the prediction at the resolution of ``im1`` (stride-1 refiner).
            batched: accepted for compatibility with the original API; inferred from the input
                (unlike the v11 release's batched mode, tensors are RGB in [0, 1] at any size, not
                ImageNet-normalized at the internal resolution: out-of-range values raise).
            device: accepted for compatibility with DKMv3's ``match(..., device=...)``; matching runs
                on the model's device, and another device raises (move the model with ``.to()``).
            fast: override the model's default inference path (see the class docstring).
            dtype: reduced-precision compute dtype, via autocast: ``torch.float32`` (default),
                ``torch.bfloat16`` or ``torch.float16`` (CUDA; CPUs with AMX-FP16). Fast path only.
                Warns once where it is no faster than float32 (a CPU without kernels for it, where the
                fast path convolves the rounded operands with float32 kernels, or e.g. float16 on a CPU
                with AVX512-FP16 but no AMX-FP16).
            precision_scope: what ``dtype`` applies to (default: the model's
                ``inference_precision_scope``, ``"refiners"``). ``"refiners"``: the refiners'
                convolutions (most of the FLOPs; 0.01 px from float32 at the 99th percentile on the
                parity fixture in either dtype). ``"network"``: also the encoder, the stride-16/32
                projections and the embedding decoder (faster), whose rounding reaches the GP: its
                kernel amplifies it, so the mantissa matters. With the fixture's synthetic weights the
                flow moves by 0.39 px at the 99th percentile in float16 (10-bit mantissa) and by 2.8 px
                in bfloat16 (7 bits), where rounding the GP's input features to bfloat16 alone
                already costs 0.58 px: use float16 with this scope where it is fast, and measure on
                your data. Either way the GP (kernel and solve), the flow outputs and all coordinate
                arithmetic stay in float32.

        Returns:
            ``dense_matches`` (H, W, 4) = ``[x_q, y_q, x_s, y_s]`` in normalized coordinates and
            ``dense_certainty`` (H, W) in [0, 1]; with a leading batch dim for 4-D tensor inputs.
            ``H, W`` are the internal resolution, or ``im1``'s with ``do_pred_in_og_res``.

        DKMv3 (``version="v3"``): ``H, W`` are the internal resolution, or ``upsample_res`` if
        ``upsample_preds``; a ``symmetric`` model returns ``(H, 2W, 4)``: columns ``:W`` hold
        ``[grid_q, q->s]``, columns ``W:`` hold ``[s->q, grid_s]`` (every row a query/support pair, so
        :meth:`sample` and :meth:`to_pixel_coordinates` apply unchanged). Certainty is
        ``sigmoid(fine - 0.5 * min(coarse, 0))`` with ``coarse`` the stride-16 logit resized, and 0 where
        the prediction leaves the other image (the flow is then clamped to [-1, 1]).
        ``check_cycle_consistency``/``do_pred_in_og_res`` are v11 options and raise for v3.
        """
        if len(args) > 3:
            raise TypeError(f"match() takes at most 5 positional arguments (im1, im2, batched, "
                            f"check_cycle_consistency, do_pred_in_og_res), got {2 + len(args)}")
        if args:  # original positional order: (im1, im2, batched, check_cycle_consistency, do_pred_in_og_res)
            names = ["batched", "check_cycle_consistency", "do_pred_in_og_res"]
            opts = dict(zip(names, args))
            batched = opts.get("batched", batched)
            check_cycle_consistency = opts.get("check_cycle_consistency", check_cycle_consistency)
            do_pred_in_og_res = opts.get("do_pred_in_og_res", do_pred_in_og_res)
        if device is not None:
            want = torch.device(device)
            if want.type != self.device.type or want.index not in (None, self.device.index):
                raise ValueError(f"match(device={device}): the model is on {self.device}; move it with model.to(...)")
        fast = self.fast if fast is None else fast
        dtype = dtype or self.inference_dtype or torch.float32
        scope = precision_scope or self.inference_precision_scope
        if scope not in PRECISION_SCOPES:
            raise ValueError(f"precision_scope={scope!r}: expected one of {PRECISION_SCOPES}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={dtype}: expected torch.float32, torch.bfloat16 or torch.float16")
        if dtype != torch.float32 and not fast:
            raise ValueError(f"dtype={dtype} needs the fast path (fast=True); the faithful path is float32")
        support = "fast" if dtype == torch.float32 else reduced_precision_support(self.device, dtype)
        if support != "fast":
            warned = self.__dict__.setdefault("_warned_dtypes", set())
            if (self.device.type, dtype) not in warned:
                warned.add((self.device.type, dtype))
                how = {"native (no faster than float32)": "native but no faster than",
                       "emulated": ("emulated (float32 kernels on rounded operands), no faster than"
                                    if self.device.type == "cpu" else "emulated, many times slower than")}[support]
                need = {"cpu": CPU_FAST_NEEDS, "cuda": CUDA_FAST_NEEDS}.get(self.device.type, {}).get(
                    dtype, "a device that supports it")
                log.warning("match(dtype=%s): %s convolutions on this %s are %s float32 (faster ones need %s)",
                            dtype, dtype, self.device.type, how, need)
        with _no_enclosing_autocast(self.device):  # precision is what dtype= says, also inside a user's autocast
            return self._match(im1, im2, check_cycle_consistency, do_pred_in_og_res, fast, dtype, scope)

    def _match(self, im1, im2, check_cycle_consistency, do_pred_in_og_res, fast, dtype, scope):
        """:meth:`match` after its arguments are resolved."""
        was_training = self.training
        if self.version == "v3":
            if check_cycle_consistency or do_pred_in_og_res:
                raise ValueError("DKMv3 match(): check_cycle_consistency and do_pred_in_og_res are v11 options; "
                                 "DKMv3 matches both directions (symmetric) and refines at upsample_res "
                                 "(upsample_preds)")
            if self.upsample_preds and self.upsample_res is None:
                raise ValueError("DKMv3 match(): upsample_preds is on but upsample_res is None; set "
                                 "model.upsample_res = (H, W) (the release: (864, 1152))")
            self.train(False)
            try:
                return self._match_v3(im1, im2, fast, dtype, scope)
            finally:
                self.train(was_training)
        self.train(False)
        try:
            query, support, full, is_batched = self._prepare(im1, im2)
            b = query.shape[0]
            with torch.inference_mode() if fast else torch.no_grad():  # (inference_mode(False) re-enables autograd)
                if fast:
                    q2s, certainty, s2q = self._dense_fast(query, support, check_cycle_consistency, dtype, scope)
                else:
                    q2s, certainty, s2q = self._dense_faithful(query, support, check_cycle_consistency)
                q2s = q2s.permute(0, 2, 3, 1)
                hs, ws = query.shape[-2:]
                if do_pred_in_og_res:
                    og_q, og_s = full()
                    q2s, certainty = self.decoder.upsample_preds(q2s, certainty, og_q, og_s, fast=fast,
                                                                 refine_dtype=dtype)
                    hs, ws = og_q.shape[-2:]
            query_coords = normalized_grid(hs, ws, device=q2s.device, dtype=q2s.dtype, batch=b).permute(0, 3, 1, 2)
            certainty = certainty.sigmoid()
            if check_cycle_consistency:
                query_coords, q2s, stable = self.stable_neighbours(query_coords, q2s, s2q)
                certainty = certainty * (stable[:, None].to(certainty.dtype) + 1e-3)
            matches = torch.cat((query_coords.permute(0, 2, 3, 1), q2s.clamp(-1, 1)), dim=-1)
            certainty = certainty[:, 0]
        finally:
            self.train(was_training)
        if is_batched:
            return matches, certainty
        return matches[0], certainty[0]

    # ------------------------------------------------------------------ sparse matches
    @_SampleMethod
    def sample(self, matches, certainty, num: int | None = None, relative_confidence_threshold: float = 0.0,
               generator: torch.Generator | None = None, mode: str | None = None):
        """Sample up to ``num`` matches without replacement.

        ``mode`` (default: the model's ``sample_mode``; ``"proportional"`` when called on the class,
        ``RegressionMatcher.sample(...)``): ``"proportional"`` = probability proportional to
        certainty, among those with ``certainty / max(certainty) > relative_confidence_threshold``
        and ``certainty > 0`` (v11); DKMv3's ``"threshold_balanced"`` and the other modes of
        :mod:`dkm.models.sampling` (``relative_confidence_threshold`` > 0 filters first there too).

        Args:
            matches: (..., 4) tensor or array of one pair, e.g. ``(H, W, 4)``, ``(1, H, W, 4)`` or ``(N, 4)``
                (a batch ``(B, H, W, 4)`` with ``B > 1`` is refused: sample each pair);
                certainty: (...) matching its leading dims.
            num: default as in each release: 20000 for v11 (and on the class), 10000 for DKMv3.
            generator: a ``torch.Generator`` for reproducibility (on any device).
        Returns:
            ``(n, 4)`` matches and their ``(n,)`` certainties (as given, not the mode's weights),
            ``n = min(num, #candidates with positive weight)``; numpy in -> numpy out, tensors stay
            on their device.
        """
        if num is None:
            num = 10000 if self is not None and self.version == "v3" else 20000
        if mode is None:
            mode = self.sample_mode if self is not None else "proportional"
        thresh = self.sample_thresh if self is not None else 0.05
        if isinstance(num, bool) or int(num) != num or num < 0:
            raise ValueError(f"sample(num={num!r}): expected a whole number >= 0")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"sample(generator={generator!r}): expected a torch.Generator, "
                            "e.g. torch.Generator().manual_seed(0), or None")
        as_numpy = isinstance(matches, np.ndarray)
        m = torch.as_tensor(matches)
        if m.dim() < 1 or m.shape[-1] != 4:
            raise ValueError(f"sample(): matches of shape {tuple(m.shape)}; expected (..., 4) = [x_A, y_A, x_B, y_B] "
                             "as match() returns them")
        if m.dim() == 4 and m.shape[0] > 1:  # match() on a batch: (B, H, W, 4); pooling would mix the pairs
            raise ValueError(f"sample(): matches of shape {tuple(m.shape)} hold {m.shape[0]} pairs; sample each "
                             "pair on its own: sample(matches[i], certainty[i], ...)")
        m = m.reshape(-1, 4)
        c = torch.as_tensor(certainty, device=m.device).reshape(-1).to(m.dtype if m.is_floating_point() else torch.float32)
        if c.numel() != m.shape[0]:
            raise ValueError(f"sample(): {m.shape[0]} matches but {c.numel()} certainties")
        if c.numel() == 0 or not torch.isfinite(c).all():
            raise ValueError("sample(): certainty is empty or not finite")
        if mode != "proportional":
            if relative_confidence_threshold > 0:
                cmax = c.max()
                keep = c / cmax > relative_confidence_threshold if cmax > 0 else torch.zeros_like(c, dtype=torch.bool)
                m, c = m[keep], c[keep]
            idx, _ = sample_matches(m, c, int(num), mode, thresh, generator)
            m, c = m[idx], c[idx]
            return (m.cpu().numpy(), c.cpu().numpy()) if as_numpy else (m, c)
        cmax = c.max()
        keep = (c / cmax > relative_confidence_threshold) & (c > 0) if cmax > 0 else torch.zeros_like(c, dtype=torch.bool)
        m, c = m[keep], c[keep]
        n = min(int(num), c.numel())
        # Gumbel-top-k: sampling without replacement proportional to c, on any device and size.
        gen_device = generator.device if generator is not None else c.device
        u = torch.rand(c.shape, generator=generator, device=gen_device, dtype=torch.float64).to(c.device)
        keys = c.double().log() - (-u.clamp_min(1e-300).log()).log()
        idx = keys.topk(n).indices
        m, c = m[idx], c[idx]
        if as_numpy:
            return m.cpu().numpy(), c.cpu().numpy()
        return m, c

    @staticmethod
    def to_pixel_coordinates(matches, H_A: int, W_A: int, H_B: int, W_B: int, center: float = DEFAULT_CENTER):
        """Normalized matches (..., 4) -> pixel keypoints ``kpts_A`` (..., 2) in image A (H_A x W_A)
        and ``kpts_B`` (..., 2) in image B; ``center`` as in :mod:`dkm.geometry.coords`."""
        if matches.shape[-1] != 4:
            raise ValueError(f"to_pixel_coordinates(): matches of shape {tuple(matches.shape)}; expected (..., 4) "
                             "= [x_A, y_A, x_B, y_B] as match()/sample() return them")
        return (normalized_to_pixel(matches[..., :2], H_A, W_A, center),
                normalized_to_pixel(matches[..., 2:], H_B, W_B, center))
