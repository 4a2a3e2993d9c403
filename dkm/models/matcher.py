"""RegressionMatcher: the DKM model (encoder + decoder) and its user-facing ``match``/``sample``."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.coords import DEFAULT_CENTER, normalized_grid, normalized_to_pixel
from ..utils.image import check_image_tensor, load_image, normalize, pil_to_tensor, resize_tensor


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
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, h: int = 384, w: int = 512,
                 fast: bool = True, inference_batch_size: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.h_resized = h
        self.w_resized = w
        self.fast = fast
        self.inference_batch_size = inference_batch_size
        self.inference_dtype: torch.dtype | None = None  # default ``dtype`` of match()

    # ------------------------------------------------------------------ network
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def extract_backbone_features(self, batch: dict) -> dict:
        """Encode ``cat(query, support)`` in one pass: ``{stride: (2B, C, h, w)}``."""
        return self.encoder(torch.cat((batch["query"], batch["support"])))

    def forward(self, batch: dict) -> dict:
        """``batch["query"]``, ``batch["support"]`` (B, 3, H, W) ImageNet-normalized ->
        ``{stride: {"dense_flow": (B, 2, H/s, W/s), "dense_certainty": (B, 1, H/s, W/s)}}``."""
        pyramid = self.extract_backbone_features(batch)
        f_q = {s: f.chunk(2)[0] for s, f in pyramid.items()}
        f_s = {s: f.chunk(2)[1] for s, f in pyramid.items()}
        return self.decoder(f_q, f_s)

    def forward_symmetric(self, batch: dict) -> dict:
        """Both directions at once: outputs have batch 2B, ``[query->support, support->query]``."""
        pyramid = self.extract_backbone_features(batch)
        f_s = {s: torch.cat(f.chunk(2)[::-1]) for s, f in pyramid.items()}
        return self.decoder(pyramid, f_s)

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
        """Inputs -> (query, support) normalized at the internal resolution, the full-resolution
        normalized images (for ``do_pred_in_og_res``) and whether the input was batched."""
        size = (self.h_resized, self.w_resized)
        if isinstance(im1, torch.Tensor) != isinstance(im2, torch.Tensor):
            raise TypeError("im1 and im2 must both be tensors or both be images/paths")
        if isinstance(im1, torch.Tensor):
            batched = im1.dim() == 4
            x1 = check_image_tensor(im1, "im1").to(self.device)
            x2 = check_image_tensor(im2, "im2").to(self.device)
            if x1.shape[0] != x2.shape[0]:
                raise ValueError(f"im1 and im2 batch sizes differ: {x1.shape[0]} vs {x2.shape[0]}")
            query, support = normalize(resize_tensor(x1, size)), normalize(resize_tensor(x2, size))
            full = lambda: (normalize(x1), normalize(x2))  # noqa: E731
            return query, support, full, batched
        p1, p2 = load_image(im1), load_image(im2)
        query = pil_to_tensor(p1, size)[None].to(self.device)
        support = pil_to_tensor(p2, size)[None].to(self.device)
        full = lambda: (pil_to_tensor(p1)[None].to(self.device), pil_to_tensor(p2)[None].to(self.device))  # noqa: E731
        return query, support, full, False

    def _dense_fast(self, query: torch.Tensor, support: torch.Tensor, cycle: bool, dtype=None):
        """Fast path of the finest-scale prediction: ``(q2s (B, 2, h, w), certainty logits
        (B, 1, h, w), s2q (B, 2, h, w) or None)``. Pairs go through in micro-batches, one encoder
        pass per micro-batch and one decoder pass per direction (a batch-2 symmetric pass is several
        times slower on CPU). The encoder stays in float32 even when ``dtype`` is reduced: its
        stride-16/32 features feed the GP, whose exponential kernel amplifies rounding errors."""
        b = query.shape[0]
        step = self.inference_batch_size or (1 if query.device.type == "cpu" else b)
        outs = []
        for i in range(0, b, step):
            pyramid = self.encoder(torch.cat((query[i:i + step], support[i:i + step])))
            f_q = {s: f.chunk(2)[0] for s, f in pyramid.items()}
            f_s = {s: f.chunk(2)[1] for s, f in pyramid.items()}
            fwd = self.decoder(f_q, f_s, fast=True, refine_dtype=dtype)[1]
            bwd = self.decoder(f_s, f_q, fast=True, refine_dtype=dtype)[1]["dense_flow"] if cycle else None
            outs.append((fwd["dense_flow"], fwd["dense_certainty"], bwd))
        q2s = torch.cat([o[0] for o in outs])
        cert = torch.cat([o[1] for o in outs])
        s2q = torch.cat([o[2] for o in outs]) if cycle else None
        return q2s, cert, s2q

    def _dense_faithful(self, query: torch.Tensor, support: torch.Tensor, cycle: bool, dtype=None):
        """The release's path: one batched (symmetric, if ``cycle``) forward pass."""
        batch = {"query": query, "support": support}
        if cycle:
            out = self.forward_symmetric(batch)[1]
            q2s, s2q = out["dense_flow"].chunk(2)
            return q2s, out["dense_certainty"].chunk(2)[0], s2q
        out = self.forward(batch)[1]
        return out["dense_flow"], out["dense_certainty"], None

    @torch.no_grad()
    def match(self, im1, im2, *args, check_cycle_consistency: bool = False, do_pred_in_og_res: bool = False,
              batched: bool | None = None, fast: bool | None = None, dtype: torch.dtype | None = None):
        """Dense matches from ``im1`` (query) to ``im2`` (support).

        Args:
            im1, im2: paths, PIL images (any mode/size), or float tensors in [0, 1] RGB of shape
                (B, 3, H, W) (or (3, H, W)); any size: they are resized to the internal resolution.
            check_cycle_consistency: run both directions and keep certainty only on cycle-stable
                pixels (others get ``1e-3 * certainty``); the query points become the cycle-mapped ones.
            do_pred_in_og_res: refine the prediction at the resolution of ``im1`` (stride-1 refiner).
            batched: accepted for compatibility with the original API; inferred from the input.
            fast: override the model's default inference path (see the class docstring).
            dtype: compute dtype of the refiners (most of the FLOPs): ``torch.float32`` (default),
                ``torch.bfloat16`` (CPU/CUDA) or ``torch.float16`` (CUDA), via autocast; the encoder,
                the GP solve and all coordinate arithmetic stay in float32. Fast path only.

        Returns:
            ``dense_matches`` (H, W, 4) = ``[x_q, y_q, x_s, y_s]`` in normalized coordinates and
            ``dense_certainty`` (H, W) in [0, 1]; with a leading batch dim for 4-D tensor inputs.
            ``H, W`` are the internal resolution, or ``im1``'s with ``do_pred_in_og_res``.
        """
        if args:  # original positional order: (im1, im2, batched, check_cycle_consistency, do_pred_in_og_res)
            names = ["batched", "check_cycle_consistency", "do_pred_in_og_res"]
            opts = dict(zip(names, args))
            batched = opts.get("batched", batched)
            check_cycle_consistency = opts.get("check_cycle_consistency", check_cycle_consistency)
            do_pred_in_og_res = opts.get("do_pred_in_og_res", do_pred_in_og_res)
        fast = self.fast if fast is None else fast
        dtype = dtype or self.inference_dtype or torch.float32
        if dtype != torch.float32 and not fast:
            raise ValueError(f"dtype={dtype} needs the fast path (fast=True); the faithful path is float32")
        was_training = self.training
        self.train(False)
        try:
            query, support, full, is_batched = self._prepare(im1, im2)
            b = query.shape[0]
            with torch.inference_mode(fast):
                dense = self._dense_fast if fast else self._dense_faithful
                q2s, certainty, s2q = dense(query, support, check_cycle_consistency, dtype)
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
    @staticmethod
    def sample(matches, certainty, num: int = 10000, relative_confidence_threshold: float = 0.0,
               generator: torch.Generator | None = None):
        """Sample up to ``num`` matches without replacement, with probability proportional to
        certainty, among those with ``certainty / max(certainty) > relative_confidence_threshold``.

        Args:
            matches: (..., 4) tensor or array; certainty: (...) matching its leading dims.
            generator: a ``torch.Generator`` for reproducibility (on any device).
        Returns:
            ``(n, 4)`` matches and their ``(n,)`` certainties, ``n = min(num, #candidates with
            certainty > 0)``; numpy in -> numpy out, tensors stay on their device.
        """
        as_numpy = isinstance(matches, np.ndarray)
        m = torch.as_tensor(matches).reshape(-1, 4)
        c = torch.as_tensor(certainty, device=m.device).reshape(-1).to(m.dtype if m.is_floating_point() else torch.float32)
        if c.numel() != m.shape[0]:
            raise ValueError(f"sample(): {m.shape[0]} matches but {c.numel()} certainties")
        if c.numel() == 0 or not torch.isfinite(c).all():
            raise ValueError("sample(): certainty is empty or not finite")
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
        return (normalized_to_pixel(matches[..., :2], H_A, W_A, center),
                normalized_to_pixel(matches[..., 2:], H_B, W_B, center))
