"""Match one image pair and look at the result (as the DKM repository's ``demo/demo_match.py`` does).

    python -m dkm.demo im_A.jpg im_B.jpg --weights dkm_base_v11.pth
    python -m dkm.demo im_A.jpg im_B.jpg --pretrained --arch dkmv3_outdoor --num 5000

writes into ``--out`` (default ``outputs/demo/<A>-<B>``):

- ``warp.png``: A | B | B pulled back onto A through the dense warp, times certainty | certainty;
- ``matches.png``: A and B side by side with lines for some of the sampled matches;
- ``matches.npz``: the sampled matches ``kpts_A``, ``kpts_B`` (N, 2) in pixels of the original
  images (pixel centres at ``i + center``), their ``certainty`` (N,) and ``center``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .evaluation import DTYPES, model_config_for, resolve_device
from .models.matcher import PRECISION_SCOPES
from .models.zoo import ARCHITECTURES, build_model
from .utils.image import load_image, pil_to_tensor
from .viz import draw_matches, warp_panel

log = logging.getLogger(__name__)


def match_pair(model, im_A, im_B, num: int = 5000, seed: int = 0, center: float = 0.5, **match_kw) -> dict:
    """Dense and sampled matches of one pair. ``im_A``/``im_B``: paths or PIL images.

    Returns ``warp`` (H, W', 4) and ``certainty`` (H, W') as :meth:`RegressionMatcher.match` gives
    them, ``kpts_A``/``kpts_B`` (n, 2) pixel coordinates in the original images and ``sparse_certainty``
    (n,), ``n <= num`` drawn by :meth:`RegressionMatcher.sample` with a generator seeded by ``seed``."""
    A, B = load_image(im_A), load_image(im_B)
    warp, certainty = model.match(A, B, **match_kw)
    generator = torch.Generator(device=warp.device).manual_seed(seed)
    matches, sparse_certainty = model.sample(warp, certainty, num, generator=generator)
    kpts_A, kpts_B = model.to_pixel_coordinates(matches, A.height, A.width, B.height, B.width, center=center)
    return {"A": A, "B": B, "warp": warp, "certainty": certainty, "symmetric": bool(getattr(model, "symmetric", False)),
            "kpts_A": kpts_A.cpu().numpy(), "kpts_B": kpts_B.cpu().numpy(),
            "sparse_certainty": sparse_certainty.cpu().numpy()}


def save_pictures(result: dict, out_dir, max_lines: int = 300, seed: int = 0, center: float = 0.5) -> dict:
    """Write ``warp.png``, ``matches.png`` and ``matches.npz`` of a :func:`match_pair` result into
    ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    warp, certainty = result["warp"].float().cpu(), result["certainty"].float().cpu()
    if result["symmetric"]:  # DKMv3: columns :W hold A -> B, columns W: hold B -> A
        warp, certainty = warp[:, : warp.shape[1] // 2], certainty[:, : certainty.shape[1] // 2]
    h, w = warp.shape[:2]
    query, support = pil_to_tensor(result["A"], (h, w)), pil_to_tensor(result["B"], (h, w))
    paths = {"warp": out_dir / "warp.png", "matches": out_dir / "matches.png", "npz": out_dir / "matches.npz"}
    Image.fromarray(warp_panel(query, support, warp[..., 2:], certainty)).save(paths["warp"])
    picture = draw_matches(np.asarray(result["A"]), np.asarray(result["B"]), result["kpts_A"], result["kpts_B"],
                           result["sparse_certainty"], max_lines=max_lines, seed=seed, center=center)
    Image.fromarray(picture).save(paths["matches"])
    np.savez(paths["npz"], kpts_A=result["kpts_A"], kpts_B=result["kpts_B"],
             certainty=result["sparse_certainty"], center=center)
    return paths


def _count(minimum: int):
    """argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m dkm.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("im_A")
    p.add_argument("im_B")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES),
                   help="default: dkm_base, or the architecture a Lightning .ckpt of train.py was trained with")
    p.add_argument("--weights", help="a checkpoint: the official .pth or a Lightning .ckpt of train.py")
    p.add_argument("--pretrained", action="store_true", help="download the official checkpoint (torch.hub cache)")
    p.add_argument("--h", type=_count(1), help="internal height (default: the architecture's or the .ckpt's)")
    p.add_argument("--w", type=_count(1), help="internal width (default: the architecture's or the .ckpt's)")
    p.add_argument("--num", type=_count(0), default=5000, help="matches to sample")
    p.add_argument("--lines", type=_count(0), default=300, help="matches drawn in matches.png")
    p.add_argument("--center", type=float, default=0.5,
                   help="pixel coordinate of pixel 0's centre in matches.npz (0.5, or 0.0 for OpenCV's convention)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--precision-scope", default="refiners", choices=PRECISION_SCOPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: outputs/demo/<A>-<B>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.weights and not args.pretrained:
        p.error("give --weights <checkpoint> or --pretrained (an untrained DKM matches nothing)")
    images = []
    for im in (args.im_A, args.im_B):  # read before the model is built
        try:
            images.append(load_image(im))
        except (OSError, ValueError) as e:
            p.error(str(e))
    out = Path(args.out or Path("outputs") / "demo" / f"{Path(args.im_A).stem}-{Path(args.im_B).stem}")
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} exists and is not a folder")
    cfg = {"arch": args.arch or "dkm_base", "weights": args.weights, "pretrained": args.pretrained and not args.weights}
    try:
        if args.weights and Path(args.weights).is_file():  # a .ckpt of train.py knows its architecture
            cfg = model_config_for(cfg, args.weights)
        cfg |= {k: v for k, v in (("h", args.h), ("w", args.w)) if v is not None}
        model = build_model(cfg).to(resolve_device(args.device)).eval()
    except (OSError, RuntimeError, ValueError) as e:  # offline download, unreadable or mismatched checkpoint
        p.exit(2, f"{p.prog}: error: {e}\n")
    result = match_pair(model, *images, num=args.num, seed=args.seed, center=args.center,
                        dtype=DTYPES[args.dtype], precision_scope=args.precision_scope)
    paths = save_pictures(result, out, max_lines=args.lines, seed=args.seed, center=args.center)
    log.info("%d matches sampled (of %d dense matches with certainty > 0); wrote %s", len(result["kpts_A"]),
             int((result["certainty"] > 0).sum()), ", ".join(str(v) for v in paths.values()))
    return paths


if __name__ == "__main__":
    main()
