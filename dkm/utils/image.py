"""Image input handling for ``match()``: paths, PIL images and tensors -> normalized batches.

All conversions to RGB and all validation live here so that a bad input fails with a clear message
naming the file or shape, never with a shape error from inside the network.
"""
from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 2
#: how far outside [0, 1] a float image tensor may go (e.g. the overshoot of a bicubic resize; clamped);
#: beyond it match() refuses the input: ImageNet-normalized images span about [-2.1, 2.6]
RANGE_TOLERANCE = 0.25


def load_image(im) -> Image.Image:
    """Open a path (``str``/``PathLike``) or take a PIL image, and return it as 8-bit RGB.

    Grayscale, RGBA/LA (alpha dropped), palette, CMYK, 1-bit, 16-bit and float images are converted;
    16-bit and float images are scaled by their type's range: float (mode ``F``) images must be in
    [0, 1], 32-bit integer (mode ``I``) ones in [0, 65535], read as 16-bit if any value exceeds 255
    (else as 8-bit); other ranges raise.
    """
    name = "PIL image"
    if isinstance(im, (str, PathLike)):
        path = Path(im)
        name = str(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory, not an image file")
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as f:
                f.load()
                im = f.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"{path} is not a readable image file ({e})") from e
    if not isinstance(im, Image.Image):
        raise TypeError(f"expected a path, a PIL image or a tensor, got {type(im).__name__}")
    w, h = im.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ValueError(f"{name} has size {w}x{h}; images must be at least {MIN_SIDE}x{MIN_SIDE} pixels")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        top = 1.0 + RANGE_TOLERANCE if im.mode == "F" else 65535
        if not (np.isfinite(a).all() and lo >= (-RANGE_TOLERANCE if im.mode == "F" else 0) and hi <= top):
            raise ValueError(f"{name}: {'float' if im.mode == 'F' else '32-bit integer'} image (mode {im.mode}) "
                             f"with values in [{lo:g}, {hi:g}]; expected {'[0, 1]' if im.mode == 'F' else '[0, 65535]'}: "
                             "scale it to 8-bit RGB (e.g. Image.fromarray(uint8 array)) before matching")
        scale = 1.0 if im.mode == "F" else (65535.0 if im.mode.startswith("I;16") or hi > 255 else 255.0)
        a = np.clip(np.round(a / scale * 255.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(a)
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as e:  # modes PIL cannot convert to RGB, e.g. "La"
            raise ValueError(f"{name}: cannot convert image mode {im.mode} to RGB ({e}); "
                             "save or convert it as RGB or grayscale first") from e
    return im


def pil_to_tensor(im: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """8-bit RGB PIL image -> ImageNet-normalized (3, H, W) float32 tensor.

    If ``size = (H, W)`` is given the image is first resized with PIL's bicubic filter (what
    torchvision's ``Resize(..., BICUBIC)`` does on PIL images, as in the original release).
    """
    if size is not None and (im.size[1], im.size[0]) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return normalize(x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) RGB in [0, 1] -> ImageNet-normalized."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def check_image_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a (B, 3, H, W) or (3, H, W) image tensor in [0, 1] (uint8 is scaled by 1/255; values
    up to :data:`RANGE_TOLERANCE` outside [0, 1] are clamped) and return it as a float32 (or
    float64) (B, 3, H, W) tensor."""
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[-1] < MIN_SIDE or x.shape[-2] < MIN_SIDE:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; need B >= 1 and H, W >= {MIN_SIDE}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise ValueError(f"{name} must be float in [0, 1] or uint8, got dtype {x.dtype}")
    elif x.dtype not in (torch.float32, torch.float64):  # float16/bfloat16 images: in float32
        x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = x.aminmax()
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{name} has values in [{lo.item():.3g}, {hi.item():.3g}]; expected RGB in [0, 1] "
                         "(or uint8), not ImageNet-normalized: match() normalizes and resizes itself")
    if lo < 0 or hi > 1:
        x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def resize_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of (B, 3, H, W) images in [0, 1] (a close match to PIL's)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
