"""DKM's coarse-to-fine decoder: the embedding decoder (RRB/CAB) after the GP at the coarse
scales, the convolutional refiners at every scale, and the loop that ties them together.

Module and attribute names follow the released checkpoints (their state_dict keys are a contract).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry.coords import normalized_grid
from ..utils.device import autocast_to
from .fused import conv_forward, conv2d_relu, fold_batchnorm
from .local_correlation import chunk_for_budget, local_correlation, rows_for_budget


def _cat_channels_last(parts: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.cat(parts, dim=1).to(dtype)`` written straight into a channels-last tensor (one pass
    over the data instead of a concatenation, a layout copy and a cast)."""
    b, _, h, w = parts[0].shape
    out = torch.empty((b, sum(p.shape[1] for p in parts), h, w), dtype=dtype or parts[0].dtype,
                      device=parts[0].device, memory_format=torch.channels_last)
    c = 0
    for p in parts:
        out[:, c:c + p.shape[1]] = p
        c += p.shape[1]
    return out


def _with_halo(band: torch.Tensor, above: torch.Tensor | None, below: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``band`` (B, C, r, W) with ``rows`` rows of its neighbours ``above``/``below`` (B, C, rows, W)
    around it, zeros where there is no neighbour (the image border): (B, C, r + 2 rows, W), channels-last."""
    b, c, r, w = band.shape
    out = torch.empty((b, c, r + 2 * rows, w), dtype=band.dtype, device=band.device, memory_format=torch.channels_last)
    out[:, :, rows:rows + r] = band
    for sl, rows_in in ((slice(0, rows), above), (slice(rows + r, None), below)):
        if rows_in is None:
            out[:, :, sl].zero_()
        else:
            out[:, :, sl] = rows_in
    return out


def _conv_banded(bands: list, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d):
    """Yields ``conv2d_relu`` of the row bands of one image, band by band, as the convolution of their
    concatenation would give them: each band gets the bordering rows of its neighbours (zeros at the
    image border) instead of the convolution's own row padding. Empties ``bands`` as it goes: an input
    band is freed before its output is yielded (so that it is not alive while the consumer runs)."""
    rows, cols = conv.padding
    if len(bands) == 1 or rows == 0:  # nothing crosses a band border
        for i in range(len(bands)):
            band, bands[i] = bands[i], None
            out = conv2d_relu(band, weight, bias, conv)
            del band
            yield out
        return
    above = None
    for i in range(len(bands)):
        band, bands[i] = bands[i], None
        below = bands[i + 1][:, :, :rows] if i + 1 < len(bands) else None
        x = _with_halo(band, above, below, rows)
        above = band[:, :, -rows:]
        del band
        out = conv2d_relu(x, weight, bias, conv, padding=(0, cols))
        del x
        yield out


class RRB(nn.Module):
    """Residual refinement block: ``relu(conv1(x) + conv3(relu(bn(conv2(conv1(x))))))``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """``fast`` (inference): BatchNorm folded into ``conv2``, the ReLUs and the residual addition
        fused into the convolutions (:mod:`.fused`)."""
        if fast and not self.training:
            x = conv_forward(self.conv1, x)
            res = conv2d_relu(x, *fold_batchnorm(self.conv2, self.bn), self.conv2)
            return conv2d_relu(res, self.conv3.weight, self.conv3.bias, self.conv3, residual=x)
        x = self.conv1(x)
        res = self.conv3(self.relu(self.bn(self.conv2(x))))
        return self.relu(x + res)


class CAB(nn.Module):
    """Channel attention block: gates the new features by a global descriptor of (old, new)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 1)
        self.sigmod = nn.Sigmoid()  # (sic) name kept: no parameters, but part of the original module

    def forward(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        g = self.global_pooling(torch.cat([old, new], dim=1))
        g = self.sigmod(self.conv2(self.relu(self.conv1(g))))
        return old + g * new


class EmbeddingDecoder(nn.Module):
    """Decodes GP output + query features into a flow and a certainty logit at the coarse scales.

    Per scale key ``s``: ``feat_input_modules[s]`` (1x1 conv of the features), ``rrb_d[s]``,
    ``cab[s]`` (fusing with the upsampled state of the previous scale), ``rrb_u[s]`` and
    ``terminal_module[s]`` (1x1 conv to ``[certainty, flow_x, flow_y]``).
    """

    def __init__(self, scales, feat_in: int, gp_dim: int, feat_dim: int, internal_dim: int):
        super().__init__()
        self.internal_dim = internal_dim
        keys = [str(s) for s in scales]
        self.feat_input_modules = nn.ModuleDict({k: nn.Conv2d(feat_in, feat_dim, 1) for k in keys})
        self.rrb_d = nn.ModuleDict({k: RRB(gp_dim + feat_dim, internal_dim) for k in keys})
        self.cab = nn.ModuleDict({k: CAB(2 * internal_dim, internal_dim) for k in keys})
        self.rrb_u = nn.ModuleDict({k: RRB(internal_dim, internal_dim) for k in keys})
        self.terminal_module = nn.ModuleDict({k: nn.Conv2d(internal_dim, 3, 1) for k in keys})

    def scales(self) -> list[int]:
        return [int(k) for k in self.terminal_module.keys()]

    def forward(self, gp_out, feats, state, scale: int, float32_output: bool = False, fast: bool = False):
        """``gp_out`` (B, gp_dim, h, w), ``feats`` (B, C, h, w), ``state`` (B, internal_dim, h, w).

        Returns ``flow`` (B, 2, h, w), ``certainty`` logits (B, 1, h, w) and the new state.
        ``float32_output``: the terminal convolution (whose output is the flow itself, in normalized
        coordinates) runs in float32 even under autocast (reduced-precision inference).
        ``fast`` (inference): the convolutions through :mod:`.fused` (see :meth:`RRB.forward`).
        """
        k = str(scale)
        feats = conv_forward(self.feat_input_modules[k], feats) if fast else self.feat_input_modules[k](feats)
        x = torch.cat([feats, gp_out], dim=1)
        x = self.rrb_d[k](x, fast=fast)
        state = self.rrb_u[k](self.cab[k](state, x), fast=fast)
        if float32_output:
            with torch.autocast(state.device.type, enabled=False):
                out = self.terminal_module[k](state.to(self.terminal_module[k].weight.dtype))
        else:
            out = self.terminal_module[k](state)
        return out[:, -2:], out[:, :-2], state


class ConvRefiner(nn.Module):
    """Predicts a certainty update and a displacement (in units of 1/4 pixel at the refiner's
    stride... see :meth:`Decoder.forward`) from query features and support features warped by the
    current flow.

    Each block is ``Sequential(conv kxk (depthwise if dw), BatchNorm, ReLU, conv 1x1)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 3, kernel_size: int = 5,
                 dw: bool = True, hidden_blocks: int = 8, displacement_emb_dim: int | None = None,
                 local_corr_radius: int | None = None, corr_chunk: int | None = None):
        super().__init__()
        self.block1 = self._block(in_dim, hidden_dim, kernel_size, dw)
        self.hidden_blocks = nn.Sequential(
            *[self._block(hidden_dim, hidden_dim, kernel_size, dw) for _ in range(hidden_blocks)]
        )
        self.out_conv = nn.Conv2d(hidden_dim, out_dim, 1)
        # DKMv3: an embedding of the current displacement and a local correlation volume around the
        # current match are appended to the refiner's input.
        self.disp_emb = nn.Conv2d(2, displacement_emb_dim, 1) if displacement_emb_dim else None
        if local_corr_radius and not displacement_emb_dim:
            raise ValueError("local_corr_radius needs displacement_emb_dim (the DKMv3 refiner layout)")
        self.local_corr_radius = local_corr_radius or None
        #: window offsets per grid_sample call of the fast path's local correlation (bounds its memory;
        #: None = as many as fit in 7 * 2**20 sampled elements, see chunk_for_budget)
        self.corr_chunk = corr_chunk
        #: fast path: activations above this many bytes are refined in row bands (see _refine_folded)
        self.band_bytes = 28 << 20

    @staticmethod
    def _block(in_dim, out_dim, kernel_size, dw):
        if dw and out_dim % in_dim != 0:
            raise ValueError(f"depthwise block needs out_dim % in_dim == 0, got {out_dim} and {in_dim}")
        return nn.Sequential(
            nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, groups=in_dim if dw else 1),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_dim, out_dim, 1),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor, flow: torch.Tensor, fast: bool = False):
        """``x``, ``y`` (B, C, h, w) query/support features, ``flow`` (B, 2, h, w) normalized.

        Returns ``certainty`` delta (B, 1, h, w) and ``displacement`` (B, 2, h, w), in float32.
        ``fast`` (inference only): BatchNorm folded into the depthwise convs, channels-last layout.
        """
        with torch.no_grad():  # gradients through grid_sample were unstable in the original work
            y_warped = F.grid_sample(y.to(flow.dtype), flow.permute(0, 2, 3, 1), mode="bilinear", align_corners=False)
        folded = fast and not self.training
        # (the fast path casts while it concatenates: no round trip of reduced-precision features)
        parts = [x if folded else x.to(y_warped.dtype), y_warped]
        del y_warped
        if self.disp_emb is not None:  # DKMv3: [x, warped y, displacement embedding, local correlation]
            parts += self._v3_inputs(x, y, flow, fast)
        if folded:
            d = self._refine_folded(parts)  # takes ownership: each activation is freed once consumed
        else:
            d = self.out_conv(self.hidden_blocks(self.block1(torch.cat(parts, dim=1))))
        d = d.to(flow.dtype)
        return d[:, :-2], d[:, -2:]

    def _v3_inputs(self, x: torch.Tensor, y: torch.Tensor, flow: torch.Tensor, fast: bool) -> list:
        """DKMv3's extra refiner inputs, in float32: the embedding (B, E, h, w) of the displacement
        ``flow - own position`` and, if configured, the local correlation (B, (2r+1)^2, h, w) of ``x``
        with ``y`` around the flow target (outside autocast; the fast path samples the window in
        chunks of offsets and bands of rows instead of one (B, C, h, w, (2r+1)^2) tensor)."""
        b, _, h, w = x.shape
        grid = normalized_grid(h, w, device=flow.device, dtype=flow.dtype, batch=b).permute(0, 3, 1, 2)
        with torch.autocast(x.device.type, enabled=False):
            parts = [self.disp_emb((flow - grid).to(self.disp_emb.weight.dtype)).to(flow.dtype)]
            if self.local_corr_radius:
                chunk = rows = None
                if fast and not self.training:
                    chunk = self.corr_chunk or chunk_for_budget(*x.shape)
                    rows = rows_for_budget(b, x.shape[1], w, chunk)
                parts.append(local_correlation(x.to(flow.dtype), y.to(flow.dtype), self.local_corr_radius,
                                               flow=flow, chunk=chunk, rows=rows))
        return parts

    def _refine_folded(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The blocks and ``out_conv`` on the channels-last concatenation of ``parts`` (emptied: the
        list is the only reference the caller keeps): (B, out_dim, h, w). Eval-mode BatchNorm is
        folded into the depthwise convolutions and the ReLU fused into them (:mod:`.fused`; a few kB
        of weights folded per call, so it always reflects the current parameters).

        Activations larger than ``band_bytes`` are processed in row bands, block by block, each
        band with the two bordering rows of its neighbours (same result). glibc serves every block
        above 32 MiB with a fresh mapping, page-faulted in and unmapped on each use; bands stay
        below that and are recycled by the heap (DKMv3's stride-1/2/4 refiners, large images)."""
        device = parts[0].device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))
        b, _, h, w = parts[0].shape
        blocks = (self.block1, *self.hidden_blocks)
        channels = max(max(blk[0].in_channels, blk[0].out_channels) for blk in blocks)
        nbytes = b * channels * h * w * torch.finfo(dtype).bits // 8
        halo = max(blk[0].padding[0] for blk in blocks)
        n = max(1, min(-(-nbytes // self.band_bytes), h // max(halo, 1)))
        starts = list(range(0, h, -(-h // n)))
        if len(starts) > 1 and h - starts[-1] < halo:  # every band at least as tall as the halo
            starts.pop()
        bands = [_cat_channels_last([p[:, :, a:e] for p in parts], dtype) for a, e in zip(starts, starts[1:] + [h])]
        parts.clear()
        for conv, bn, _, pointwise in blocks:  # weights cast to the compute dtype once, not per band
            weight, bias = (t.to(dtype) for t in fold_batchnorm(conv, bn))
            pw_weight, pw_bias = pointwise.weight.to(dtype), pointwise.bias.to(dtype)
            bands = [conv2d_relu(d, pw_weight, pw_bias, pointwise, relu=False)
                     for d in _conv_banded(bands, weight, bias, conv)]
        out_weight, out_bias = self.out_conv.weight.to(dtype), self.out_conv.bias.to(dtype)
        out = [conv2d_relu(d, out_weight, out_bias, self.out_conv, relu=False) for d in bands]
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class Decoder(nn.Module):
    """The coarse-to-fine loop over scales 32, 16, 8, 4, 2, 1.

    At coarse scales (those of the embedding decoder) the GP matcher and embedding decoder predict an
    absolute flow; at every scale with a refiner, a displacement ``scale * d / (4 * W)`` (x) and
    ``scale * d / (4 * H)`` (y), ``(H, W)`` the full-resolution size, is added and the certainty logit
    is updated additively. Between scales flow and certainty are bilinearly upsampled and, if
    ``detach``, detached (as in training of the released models).
    """

    SCALES = (32, 16, 8, 4, 2, 1)
    UPSAMPLE_SCALES = (8, 4, 2, 1)

    def __init__(self, embedding_decoder: EmbeddingDecoder, gps: nn.ModuleDict, proj: nn.ModuleDict,
                 conv_refiner: nn.ModuleDict, detach: bool = True):
        super().__init__()
        self.embedding_decoder = embedding_decoder
        self.gps = gps
        self.proj = proj
        self.conv_refiner = conv_refiner
        self.detach = detach

    def forward(self, f_q: dict, f_s: dict, fast: bool = False, refine_dtype: torch.dtype | None = None,
                upsample: bool = False, flow: torch.Tensor | None = None, certainty: torch.Tensor | None = None,
                consume: bool = False, coarse_dtype: torch.dtype | None = None) -> dict:
        """Feature pyramids ``{stride: (B, C, H/stride, W/stride)}`` -> ``{stride: {"dense_flow":
        (B, 2, h, w), "dense_certainty": (B, 1, h, w)}}`` (flow in normalized support coordinates,
        certainty as logits; float32 also under autocast).

        ``fast``: the inference fast path of the GP and refiners (same function, different rounding).
        ``refine_dtype``: run the refiners' convolutions under autocast in this dtype (bfloat16 or
        float16); the GP, the embedding decoder and all flow arithmetic stay in float32.
        ``coarse_dtype``: likewise for the stride-16/32 projections and the embedding decoder (its last
        convolution, which outputs the flow, stays float32); the GP always runs in float32.
        ``upsample`` (DKMv3): only the refiners at strides 8, 4, 2, 1 run, starting from ``flow``
        (B, 2, h', w') and ``certainty`` (B, 1, h', w') logits resized to the stride-8 grid.
        ``consume`` (inference): remove each level from ``f_q`` and ``f_s`` once its scale is done, so
        that its memory is freed before the finer (larger) scales run.
        """
        coarse = self.embedding_decoder.scales()
        sizes = {s: f_q[s].shape[-2:] for s in f_q}
        h, w = sizes[1]
        scales = self.UPSAMPLE_SCALES if upsample else self.SCALES
        ref = f_q[scales[0]]
        b = ref.shape[0]
        dtype = torch.promote_types(ref.dtype, torch.float32)  # flow/certainty never in half precision
        if upsample:
            if flow is None or certainty is None:
                raise ValueError("the upsampling pass needs the previous flow and certainty")
            flow = F.interpolate(flow.to(dtype), size=sizes[scales[0]], mode="bilinear", align_corners=False)
            certainty = F.interpolate(certainty.to(dtype), size=sizes[scales[0]], mode="bilinear", align_corners=False)
        else:
            state = ref.new_zeros(b, self.embedding_decoder.internal_dim, *sizes[32])
            flow = normalized_grid(*sizes[32], device=ref.device, dtype=dtype, batch=b).permute(0, 3, 1, 2)
            certainty = 0.0
        del ref
        out = {}
        for s in scales:
            k = str(s)
            fq, fs = f_q[s], f_s[s]
            if k in self.proj:
                proj = functools.partial(conv_forward, self.proj[k]) if fast and not self.training else self.proj[k]
                with autocast_to(fq.device, coarse_dtype):
                    fq, fs = proj(fq), proj(fs)
            if s in coarse and not upsample:
                state = F.interpolate(state, size=sizes[s], mode="bilinear", align_corners=False)
                gp_out = self.gps[k](fq, fs, fast=fast)
                with autocast_to(fq.device, coarse_dtype):
                    flow, certainty, state = self.embedding_decoder(
                        gp_out, fq, state, s, float32_output=coarse_dtype is not None, fast=fast and not self.training)
                flow, certainty = flow.to(dtype), certainty.to(dtype)
            if k in self.conv_refiner:
                with autocast_to(fq.device, refine_dtype):
                    delta_c, disp = self.conv_refiner[k](fq, fs, flow, fast=fast)
                flow = torch.stack(
                    (flow[:, 0] + s * disp[:, 0] / (4 * w), flow[:, 1] + s * disp[:, 1] / (4 * h)), dim=1
                )
                certainty = certainty + delta_c
            out[s] = {"dense_flow": flow, "dense_certainty": certainty}
            if consume:
                del fq, fs
                f_q.pop(s), f_s.pop(s)
            if s != 1:
                nxt = sizes[s // 2]
                flow = F.interpolate(flow, size=nxt, mode="bilinear", align_corners=False)
                certainty = F.interpolate(certainty, size=nxt, mode="bilinear", align_corners=False)
                if self.detach:
                    flow, certainty = flow.detach(), certainty.detach()
        return out

    def upsample_preds(self, flow: torch.Tensor, certainty: torch.Tensor, query: torch.Tensor,
                       support: torch.Tensor, iterations: int = 3, fast: bool = False,
                       refine_dtype: torch.dtype | None = None):
        """Refine a prediction at the images' full resolution with the stride-1 refiner.

        ``flow`` (B, h, w, 2), ``certainty`` (B, 1, h, w) logits, ``query``/``support`` (B, 3, H, W)
        normalized images. Returns flow (B, H, W, 2) and certainty logits (B, 1, H, W).
        """
        H, W = query.shape[-2:]
        flow = F.interpolate(flow.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False)
        certainty = F.interpolate(certainty, size=(H, W), mode="bilinear", align_corners=False)
        for _ in range(iterations):
            with autocast_to(query.device, refine_dtype):
                delta_c, disp = self.conv_refiner["1"](query, support, flow, fast=fast)
            disp = delta_c.sigmoid() * disp
            flow = torch.stack((flow[:, 0] + disp[:, 0] / (4 * W), flow[:, 1] + disp[:, 1] / (4 * H)), dim=1)
            certainty = certainty + delta_c
        return flow.permute(0, 2, 3, 1), certainty
