"""Named DKM configurations and checkpoint loading (official URLs, local paths, key checks)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50

from .decoder import ConvRefiner, Decoder, EmbeddingDecoder
from .encoder import PYRAMID_CHANNELS, Encoder
from .gp import GP
from .matcher import RegressionMatcher

log = logging.getLogger(__name__)

#: Official checkpoints of the DKM release, by (architecture, version).
WEIGHT_URLS = {
    ("dkm_base", "v11"): "https://github.com/Parskatt/storage/releases/download/dkm/dkm_base_v11.pth",
    ("dkmv3_outdoor", "v3"): "https://github.com/Parskatt/storage/releases/download/dkmv3/DKMv3_outdoor.pth",
    ("dkmv3_indoor", "v3"): "https://github.com/Parskatt/storage/releases/download/dkmv3/DKMv3_indoor.pth",
}
_BACKBONES = {"resnet50": resnet50, "resnet18": resnet18}
_IMAGENET_WEIGHTS = {"resnet50": "IMAGENET1K_V1", "resnet18": "IMAGENET1K_V1"}


def make_backbone(name: str, weights=None) -> nn.Module:
    """torchvision ResNet ``name``; ``weights`` = None (random init), ``"imagenet"`` (torchvision's
    ImageNet weights, downloaded once into the torch hub cache) or a path to a ResNet state_dict."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(_BACKBONES)}")
    if weights is None:
        return _BACKBONES[name](weights=None)
    if isinstance(weights, str) and weights.lower() == "imagenet":
        try:
            return _BACKBONES[name](weights=_IMAGENET_WEIGHTS[name])
        except Exception as e:  # offline: urllib errors, hub errors
            raise RuntimeError(
                f"could not get torchvision's ImageNet weights for {name} ({e}). Offline, download them "
                f"elsewhere and pass the file as backbone_weights=<path> (Hydra: model.backbone_weights=<path>), or "
                f"use backbone_weights=None (model.backbone_weights=null: random init)."
            ) from e
    net = _BACKBONES[name](weights=None)
    sd = _read_state_dict(weights)
    check_state_dict(net, sd, f"backbone_weights={weights}")
    net.load_state_dict(sd)
    return net


def build_dkm(
    *,
    backbone: str = "resnet50",
    backbone_weights=None,
    proj_dim: int = 512,
    gp_dim: int = 256,
    feat_dim: int = 256,
    dfn_dim: int = 384,
    refiner_hidden: Mapping[int, int] | None = None,
    refiner_blocks: int = 8,
    kernel_size: int = 5,
    kernel_temperature: float = 0.2,
    h: int = 384,
    w: int = 512,
    fast: bool = True,
    inference_batch_size: int | None = None,
    version: str = "v11",
    encoder_attr: str = "resnet",
    freeze_bn: bool = False,
    displacement_emb: Mapping[int, int] | None = None,
    local_corr_radius: Mapping[int, int] | None = None,
    symmetric: bool = False,
    upsample_preds: bool = False,
    upsample_res=None,
    sample_mode: str = "proportional",
    sample_thresh: float = 0.05,
    name: str | None = None,
) -> RegressionMatcher:
    """Build a DKM :class:`RegressionMatcher`. Defaults are the v11 ``dkm_base`` architecture.

    GP + embedding decoder at strides 32 and 16 (after 1x1 projections of the backbone features to
    ``proj_dim``), depthwise conv refiners at strides 16, 8, 4, 2, 1 with ``refiner_hidden[s]`` channels.

    DKMv3 differs only by options: the backbone under ``encoder.net`` (``encoder_attr``), refiners
    that also see a ``displacement_emb[s]``-channel embedding of the displacement and, where
    ``local_corr_radius[s]`` is set, a ``(2r+1)^2``-channel local correlation; ``version="v3"``
    selects its match() conventions (``symmetric``, ``upsample_preds`` at ``upsample_res``) and
    ``sample_mode="threshold_balanced"``.
    """
    if refiner_hidden is None:
        refiner_hidden = {16: 1024, 8: 1024, 4: 512, 2: 128, 1: 24}
    refiner_hidden = {int(k): int(v) for k, v in refiner_hidden.items()}
    ch = PYRAMID_CHANNELS[backbone]
    coarse = (32, 16)
    proj = nn.ModuleDict({str(s): nn.Conv2d(ch[s], proj_dim, 1) for s in (16, 32)})
    in_ch = {s: (proj_dim if s in coarse else ch[s]) for s in ch}
    emb = {int(k): int(v) for k, v in (displacement_emb or {}).items()}
    corr = {int(k): int(v) for k, v in (local_corr_radius or {}).items() if v}
    if set(corr) - set(emb):
        raise ValueError(f"local_corr_radius at strides {sorted(set(corr) - set(emb))} needs displacement_emb there")
    decoder = Decoder(
        EmbeddingDecoder(coarse, feat_in=proj_dim, gp_dim=gp_dim, feat_dim=feat_dim, internal_dim=dfn_dim),
        gps=nn.ModuleDict({str(s): GP(kernel_temperature, gp_dim=gp_dim) for s in coarse}),
        proj=proj,
        conv_refiner=nn.ModuleDict(
            {
                str(s): ConvRefiner(2 * in_ch[s] + emb.get(s, 0) + ((2 * corr[s] + 1) ** 2 if corr.get(s) else 0),
                                    refiner_hidden[s], 3, kernel_size=kernel_size, hidden_blocks=refiner_blocks,
                                    displacement_emb_dim=emb.get(s), local_corr_radius=corr.get(s))
                for s in (16, 8, 4, 2, 1)
            }
        ),
        detach=True,
    )
    encoder = Encoder(make_backbone(backbone, backbone_weights), attr=encoder_attr, freeze_bn=freeze_bn)
    return RegressionMatcher(encoder, decoder, h=h, w=w, fast=fast, inference_batch_size=inference_batch_size,
                             symmetric=symmetric, upsample_preds=upsample_preds,
                             upsample_res=tuple(upsample_res) if upsample_res is not None else None,
                             sample_mode=sample_mode, sample_thresh=sample_thresh, name=name, version=version)


_DKMV3 = dict(
    version="v3", encoder_attr="net", freeze_bn=False,
    displacement_emb={16: 128, 8: 64, 4: 32, 2: 16, 1: 6},
    local_corr_radius={16: 7, 8: 3, 4: 2},
    refiner_hidden={16: 2 * 512 + 128 + 15**2, 8: 2 * 512 + 64 + 7**2, 4: 2 * 256 + 32 + 5**2, 2: 2 * 64 + 16, 1: 24},
    symmetric=True, sample_mode="threshold_balanced", sample_thresh=0.05,
)

#: Architectures by name: keyword arguments of :func:`build_dkm`.
ARCHITECTURES = {
    "dkm_base": {},
    "dkm_small": dict(
        backbone="resnet18", proj_dim=256, gp_dim=128, feat_dim=128, dfn_dim=192,
        refiner_hidden={16: 512, 8: 256, 4: 128, 2: 128, 1: 24}, refiner_blocks=4, h=192, w=256,
    ),
    # DKMv3 (Edstedt et al., CVPR 2023 release): v11 + displacement embeddings and local correlation
    # in the refiners (hidden width = input width), symmetric matching, balanced sampling.
    "dkmv3_outdoor": dict(_DKMV3, h=540, w=720, upsample_preds=True, upsample_res=(864, 1152), name="DKMv3"),
    # (indoor: no upsampling pass by default; the release's model always carried upsample_res = (864, 1152)
    # for model.upsample_preds = True)
    "dkmv3_indoor": dict(_DKMV3, h=480, w=640, upsample_preds=False, upsample_res=(864, 1152), name="DKMv3"),
}


# ---------------------------------------------------------------------------- checkpoints
def read_checkpoint(path):
    """The object ``torch.save`` wrote to ``path`` (tensors only: ``weights_only``), memory-mapped where
    the file allows it; ``FileNotFoundError``/``ValueError`` naming the file if it is missing or is not
    a readable torch file (truncated, text, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")

    def unreadable(e: Exception) -> ValueError:
        first = str(e).splitlines()[0] if str(e) else ""
        return ValueError(f"{path} could not be read as a torch checkpoint ({type(e).__name__}: {first})")

    try:  # memory-mapped: the weights are read once, straight into the model (no second copy)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
        pass
    except Exception as e:
        raise unreadable(e) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise unreadable(e) from e


def _read_state_dict(path) -> dict:
    return _unwrap(read_checkpoint(path), str(path))


# ``conf/model`` keys that say where weights come from or how to run inference, not what was trained
NOT_TRAINED_SETTINGS = frozenset({"weights", "pretrained", "backbone_weights", "fast"})


def checkpoint_model_config(path) -> dict | None:
    """The model config a Lightning ``.ckpt`` of ``train.py`` was trained with: its stored
    ``hyper_parameters["model"]`` (``conf/model`` keys: architecture, resolution, ...) without the
    ``NOT_TRAINED_SETTINGS``; ``None`` for other checkpoints (upstream ``.pth`` files)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy or foreign files: no stored config (loading the weights reports errors)
        return None
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    model = hp.get("model") if isinstance(hp, Mapping) else None
    if not (isinstance(model, Mapping) and "arch" in model):
        return None
    return {k: v for k, v in model.items() if k not in NOT_TRAINED_SETTINGS}


def _unwrap(obj, name: str) -> dict:
    """Upstream .pth (a plain state_dict) or a Lightning .ckpt (``state_dict`` with ``model.`` keys)."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
        if any(k.startswith("model.") for k in sd):
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        return dict(sd)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{name}: expected a state_dict (mapping of names to tensors), got {type(obj).__name__}")
    return dict(obj)


def check_state_dict(model: nn.Module, state_dict: Mapping, name: str = "checkpoint", max_list: int = 5) -> None:
    """Raise ``ValueError`` listing the first missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - max_list} more)" if len(items) > max_list else ""
                parts.append(f"{len(items)} {label}: " + ", ".join(items[:max_list]) + more)
        raise ValueError(f"{name} does not fit this model ({type(model).__name__}): " + "; ".join(parts))


def architectures_fitting(state_dict: Mapping) -> list[str]:
    """The :data:`ARCHITECTURES` whose parameters have the names and shapes of ``state_dict``'s (built
    on the ``meta`` device: no memory, no download)."""
    if not all(hasattr(v, "shape") for v in state_dict.values()):
        return []
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    fits = []
    for arch, kwargs in ARCHITECTURES.items():
        with torch.device("meta"):
            ref = build_dkm(**kwargs).state_dict()
        if {k: tuple(v.shape) for k, v in ref.items()} == shapes:
            fits.append(arch)
    return fits


def load_weights(model: nn.Module, weights, assign: bool = False) -> nn.Module:
    """Load a checkpoint strictly into ``model``: a path to an upstream ``.pth`` state_dict or to a
    Lightning ``.ckpt`` of this project, or an in-memory state_dict. ``assign=True`` adopts the
    checkpoint's tensors instead of copying (for models built on the ``meta`` device)."""
    if isinstance(weights, (str, PathLike)):
        name, sd = str(weights), _read_state_dict(weights)
    else:
        name, sd = "state_dict", _unwrap(weights, "state_dict")
    try:
        check_state_dict(model, sd, name)
    except ValueError as e:
        fits = architectures_fitting(sd)
        if not fits:
            raise
        raise ValueError(f"{e}. These are the weights of {' or '.join(fits)} in its default configuration: build "
                         f"that ({', '.join(f'model={a}' for a in fits)} on the command line, without overrides "
                         "of its architecture)") from None
    if assign:  # contiguous float32 copies only where needed (e.g. a checkpoint saved in half precision)
        ref = model.state_dict()
        sd = {k: v if v.dtype == ref[k].dtype and v.is_contiguous() else v.to(ref[k].dtype).contiguous()
              for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=assign)
    return model


def download_weights(arch: str, version: str) -> dict:
    """Official checkpoint via ``torch.hub`` (cached in ``$TORCH_HOME/hub/checkpoints``)."""
    try:
        url = WEIGHT_URLS[(arch, version)]
    except KeyError:
        known = ", ".join(f"{a}/{v}" for a, v in WEIGHT_URLS)
        raise ValueError(f"no official weights for {arch} version {version!r}; known: {known}") from None
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"could not download the official {arch} {version} weights from {url} ({e}). "
            f"Download the file elsewhere and pass it as weights='<path to {url.rsplit('/', 1)[-1]}>' "
            f"(Hydra: model.weights=<path> or ckpt=<path>)."
        ) from e


def _trained_settings(arch: str, weights, given: dict) -> dict:
    """The settings a ``train.py`` ``.ckpt`` (``weights``) was trained with that the caller did not
    give (``given[k] is None``): its resolution above all (a ``.pth`` carries none). Where the caller
    gave another value, or builds another architecture, it is logged; the caller's choice holds."""
    stored = checkpoint_model_config(weights) if isinstance(weights, (str, PathLike)) else None
    if not stored:
        return {}
    stored = dict(stored)
    trained_arch = stored.pop("arch")
    if trained_arch != arch:
        log.warning("%s holds a %s model (trained with %s); building %s as asked", weights, trained_arch,
                    stored, arch)
        return {}
    differ = {k: (v, given[k]) for k, v in stored.items() if given.get(k) is not None and given[k] != v}
    if differ:
        log.warning("%s was trained with %s; building with %s as given", weights,
                    ", ".join(f"{k}={v[0]!r}" for k, v in differ.items()),
                    ", ".join(f"{k}={v[1]!r}" for k, v in differ.items()))
    return {k: v for k, v in stored.items() if given.get(k) is None}


def _check_resolution(kwargs: dict) -> None:
    """``h``, ``w`` positive ints and ``upsample_res`` None or a positive ``(H, W)``."""
    for k in ("h", "w"):
        v = kwargs.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{k}={v!r}: the internal resolution must be a positive int")
    res = kwargs.get("upsample_res")
    if res is not None and (len(tuple(res)) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                             and v > 0 for v in res)):
        raise ValueError(f"upsample_res={res!r}: expected None or (H, W), two positive ints")


def _make(arch: str, *, pretrained: bool, version: str, weights, backbone_weights, device, **overrides):
    overrides |= _trained_settings(arch, weights, overrides)
    kwargs = {**ARCHITECTURES[arch], **{k: v for k, v in overrides.items() if v is not None or k not in ("h", "w")}}
    _check_resolution(kwargs)
    versions = [v for a, v in WEIGHT_URLS if a == arch]
    if versions and version not in versions:  # the version selects the official download only: refuse a typo anyway
        raise ValueError(f"{arch} version {version!r}: official versions of {arch} are {versions}")
    if weights is None and pretrained:
        weights = download_weights(arch, version)
    if weights is None:
        model = build_dkm(backbone_weights=backbone_weights, **kwargs)
    else:  # build without allocating or initialising, then adopt the checkpoint's tensors
        with torch.device("meta"):
            model = build_dkm(backbone_weights=None, **kwargs)
        load_weights(model, weights, assign=True)
    model.eval()
    return model.to(device) if device is not None else model


def dkm_base(pretrained: bool = True, version: str = "v11", *, weights=None, h: int | None = None, w: int | None = None,
             fast: bool = True, backbone_weights="imagenet", device=None, **overrides) -> RegressionMatcher:
    """DKM v11 ``dkm_base``.

    Args:
        pretrained: load the official checkpoint (downloaded through ``torch.hub``).
        version: checkpoint version (``"v11"``).
        weights: local checkpoint path (or state_dict); takes precedence over ``pretrained``.
        h, w: internal resolution of :meth:`~RegressionMatcher.match` (default: 384x512, or the
            resolution a ``train.py`` ``.ckpt`` given as ``weights`` was trained at).
        fast: default inference path of ``match()`` (``False``: faithful to the release).
        backbone_weights: backbone init when no matcher weights are loaded: ``"imagenet"`` (as the
            release), a path to a ResNet-50 state_dict, or ``None`` (random).
        device: where to put the model (default: stays on CPU; move it with ``.to()``).
    """
    return _make("dkm_base", pretrained=pretrained, version=version, weights=weights,
                 backbone_weights=backbone_weights, device=device, h=h, w=w, fast=fast, **overrides)


def dkm_small(*, weights=None, h: int | None = None, w: int | None = None, fast: bool = True,
              backbone_weights=None, device=None, **overrides) -> RegressionMatcher:
    """A small DKM (ResNet-18, narrow decoder) for CPU experiments; no official weights. ``h, w``:
    default 192x256, or the resolution a ``train.py`` ``.ckpt`` given as ``weights`` was trained at."""
    return _make("dkm_small", pretrained=False, version="", weights=weights,
                 backbone_weights=backbone_weights, device=device, h=h, w=w, fast=fast, **overrides)


def _dkmv3(arch: str, path_to_weights, device, *, weights, pretrained, h, w, fast, backbone_weights,
           **overrides) -> RegressionMatcher:
    if path_to_weights is not None and weights is not None:
        raise ValueError("give the checkpoint either as path_to_weights or as weights=, not both")
    weights = weights if weights is not None else path_to_weights
    return _make(arch, pretrained=pretrained, version="v3", weights=weights, backbone_weights=backbone_weights,
                 device=device, h=h, w=w, fast=fast, **overrides)


def DKMv3_outdoor(path_to_weights=None, device=None, *, weights=None, pretrained: bool = True,
                  h: int | None = None, w: int | None = None, fast: bool = True, backbone_weights=None, **overrides) -> RegressionMatcher:
    """DKMv3 outdoor (MegaDepth): internal resolution 540x720, predictions refined at
    ``upsample_res = (864, 1152)`` (``model.upsample_preds = False`` turns that off), symmetric
    matching, ``sample_mode = "threshold_balanced"``.

    Args:
        path_to_weights / weights: local ``DKMv3_outdoor.pth`` (or a Lightning ``.ckpt``, or a
            state_dict); without one the official checkpoint is downloaded (``pretrained=True``).
        device: where to put the model (default: stays on CPU; the release picked CUDA if available).
        h, w: internal resolution (default 540x720, or that of a ``train.py`` ``.ckpt`` given as
            weights); fast: default inference path (``False``: faithful to the release).
        backbone_weights: backbone init when no DKM weights are loaded (``None`` = random, as the
            release's inference constructor; ``"imagenet"`` for training).
        overrides: further :func:`build_dkm` options, e.g. ``upsample_res=(H, W)``.
    """
    return _dkmv3("dkmv3_outdoor", path_to_weights, device, weights=weights, pretrained=pretrained, h=h, w=w,
                  fast=fast, backbone_weights=backbone_weights, **overrides)


def DKMv3_indoor(path_to_weights=None, device=None, *, weights=None, pretrained: bool = True,
                 h: int | None = None, w: int | None = None, fast: bool = True, backbone_weights=None, **overrides) -> RegressionMatcher:
    """DKMv3 indoor (ScanNet): internal resolution 480x640 (default), no upsampling pass (``model.upsample_preds
    = True`` turns one on at ``upsample_res = (864, 1152)``, as in the release), symmetric matching,
    ``sample_mode = "threshold_balanced"``. Arguments as :func:`DKMv3_outdoor`."""
    return _dkmv3("dkmv3_indoor", path_to_weights, device, weights=weights, pretrained=pretrained, h=h, w=w,
                  fast=fast, backbone_weights=backbone_weights, **overrides)


def build_model(cfg: Mapping) -> nn.Module:
    """Build a matcher from a ``conf/model/*.yaml`` mapping (``arch``, ``h``, ``w``, ``weights``,
    ``pretrained``, ``backbone_weights``, ``fast``; ``arch: sift`` builds the classical baseline)."""
    cfg = dict(cfg)
    if "arch" not in cfg:
        raise ValueError(f"model config without 'arch' (keys: {sorted(cfg)}); expected one of "
                         f"{sorted(ARCHITECTURES) + ['sift']}, e.g. {{'arch': 'dkm_base', 'weights': ...}}")
    arch = cfg.pop("arch")
    if arch == "sift":
        from .sift import SiftMatcher

        for k in ("weights", "pretrained", "fast", "backbone_weights"):
            cfg.pop(k, None)
        return SiftMatcher(**cfg)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {sorted(ARCHITECTURES) + ['sift']}")
    version = cfg.pop("version", "v3" if ARCHITECTURES[arch].get("version") == "v3" else "v11")
    model = _make(arch, pretrained=bool(cfg.pop("pretrained", False)), version=version,
                  weights=cfg.pop("weights", None), backbone_weights=cfg.pop("backbone_weights", None),
                  device=None, **cfg)
    return model
