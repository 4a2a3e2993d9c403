"""Speed of a DKM training step: memory format and precision variants, measured side by side in one run.

One process builds the LightningModule of ``train.py`` (model, DKM loss, AdamW) once per variant from
the same seed and trains it on the same synthetic homography batches (the quickstart's data source),
the variants interleaved step by step so that a noisy machine slows them alike. Prints the median
wall time of a step (forward, loss, backward, optimiser step), pairs per second, the speed-up against
the first variant, and each variant's loss at the first step (same weights, same batch: the variants
compute the same function up to rounding).

    python bench/train_step.py                               # dkm_small at 128x160, batch 4 (the quickstart), CPU
    python bench/train_step.py --arch dkm_base --h 384 --w 512 --batch 8 --device cuda   # the recipe's step on a GPU
    python bench/train_step.py --variants nchw channels_last bf16 bf16_channels_last --device cuda

Variants: ``nchw`` (the recipe's default), ``channels_last`` (``channels_last=true`` of
``conf/train.yaml``), ``bf16``/``fp16`` (``trainer.precision=bf16-mixed``/``16-mixed``: autocast,
the GP in float32 as in training) and ``*_channels_last`` (both). On CPU, bfloat16 autocast is fast
only where oneDNN has bfloat16 kernels (AVX512-BF16 or AMX); float16 is CUDA's.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

log = logging.getLogger("train_step")

#: name: (channels_last, autocast dtype name or None)
VARIANTS = {
    "nchw": (False, None),
    "channels_last": (True, None),
    "bf16": (False, "bfloat16"),
    "bf16_channels_last": (True, "bfloat16"),
    "fp16": (False, "float16"),
    "fp16_channels_last": (True, "float16"),
}


def batches(n: int, batch: int, h: int, w: int, seed: int = 0) -> list[dict]:
    """``n`` batches of ``batch`` synthetic homography pairs of the quickstart's training photographs."""
    from dkm.data.datamodules import collate
    from dkm.data.homography import SKIMAGE_TRAIN, SyntheticHomographyDataset, skimage_images

    ds = SyntheticHomographyDataset(skimage_images(SKIMAGE_TRAIN), h=h, w=w, length=n * batch, seed=seed)
    return [collate([ds[i * batch + j] for j in range(batch)]) for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="dkm_small")
    p.add_argument("--h", type=int, default=128, help="training height (the quickstart's 128)")
    p.add_argument("--w", type=int, default=160, help="training width (the quickstart's 160)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step (the quickstart's 4; the recipe's 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--variants", nargs="+", default=["nchw", "channels_last"], choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from dkm.lightning.module import DKMLightningModule

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_cfg = {"arch": args.arch, "h": args.h, "w": args.w, "weights": None, "pretrained": False,
                 "backbone_weights": None}
    optim = {"lr_encoder": 1e-4, "lr_decoder": 1e-4, "weight_decay": 0.01}
    runs = {}
    for name in args.variants:
        channels_last, dtype = VARIANTS[name]
        torch.manual_seed(args.seed)
        module = DKMLightningModule(model_cfg, {"ce_weight": 0.01}, optim, log_images_every_n_steps=0,
                                    channels_last=channels_last).to(device)
        # (configure_optimizers needs a Trainer for its LR schedule; the step's cost is AdamW's alone)
        opt = torch.optim.AdamW(module.parameters(), lr=optim["lr_decoder"], weight_decay=optim["weight_decay"])
        runs[name] = {"module": module, "opt": opt, "dtype": dtype and getattr(torch, dtype), "times": [], "loss": None}
    data = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            for b in batches(args.warmup + args.steps, args.batch, args.h, args.w, args.seed)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    log.info("training steps of %s at %dx%d, batch %d, %s (%d threads), %d warm-up + %d timed steps per variant",
             args.arch, args.h, args.w, args.batch, device, args.threads, args.warmup, args.steps)
    for i, batch in enumerate(data):  # the variants interleaved step by step, on the same batches
        for name, r in runs.items():
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=r["dtype"], enabled=r["dtype"] is not None):
                total = r["module"].compute_loss(batch)[0]
            r["opt"].zero_grad(set_to_none=True)
            total.backward()
            r["opt"].step()
            sync()
            if i == 0:
                r["loss"] = float(total.detach())
            if i >= args.warmup:
                r["times"].append(time.perf_counter() - t0)
    base = statistics.median(next(iter(runs.values()))["times"])
    print(f"\n{'variant':20s} {'s/step':>8s} {'pairs/s':>8s} {'speed-up':>9s} {'loss at step 1':>15s}")
    for name, r in runs.items():
        t = statistics.median(r["times"])
        print(f"{name:20s} {t:8.3f} {args.batch / t:8.3g} {base / t:8.2f}x {r['loss']:15.6f}")


if __name__ == "__main__":
    main()
