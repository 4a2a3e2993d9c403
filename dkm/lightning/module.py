"""LightningModule: the DKM model + the DKM loss + the recipe's optimiser and schedule. Nothing else."""
from __future__ import annotations

import bisect
import logging
import time

import pytorch_lightning as pl
import torch

from ..geometry.warp import gt_warp
from ..losses import DKMLoss
from ..models.zoo import build_model
from ..viz import warp_panel

log = logging.getLogger(__name__)


class DKMLightningModule(pl.LightningModule):
    """Args (all from ``conf/train.yaml``):
        model: a ``conf/model`` mapping (:func:`dkm.models.zoo.build_model`).
        loss: :class:`~dkm.losses.DKMLoss` arguments; ``ce_weight_by_source`` overrides the BCE weight
            for batches of a given data source (the indoor recipe trains ScanNet batches with 0).
        optim: ``lr_encoder``, ``lr_decoder`` (per device, as the recipe: multiplied by the number of
            devices when ``scale_lr_with_devices``), ``weight_decay``, ``milestones`` (fractions of
            ``trainer.max_steps``), ``gamma``.
        log_images_every_n_steps: 0 disables the warp images.
        channels_last: train in the channels-last (NHWC) memory format: the model's 4-D weights and the
            batch's images (in ``training_step``); every convolution then runs channels-last.
            The same computation up to rounding; on CPU a step takes about 0.75x the time (PyTorch's
            NCHW convolution backward is slow there, the depthwise refiner convolutions' above all);
            on GPUs it mainly pays with mixed precision (``bench/train_step.py`` measures both).
    """

    def __init__(self, model: dict, loss: dict, optim: dict, log_images_every_n_steps: int = 1000,
                 channels_last: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model).train()  # the zoo returns models in eval mode
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        loss = dict(loss)
        self.ce_weight_by_source = dict(loss.pop("ce_weight_by_source", None) or {})
        self.loss = DKMLoss(**loss)
        self.optim = dict(optim)
        self.log_images_every_n_steps = log_images_every_n_steps
        self._t_last = None
        # per-batch training losses, kept as device tensors until read (see loss_history): converting
        # each to a float in training_step would stall a GPU before every backward pass
        self._losses: list[float] = []
        self._pending_losses: list[torch.Tensor] = []
        self._last_image_step: int | None = None
        self.ema_decay, self.loss_ema = 0.99, None  # loss_ema: a () tensor on the module's device
        self._reset_lr_on_start = False  # set when a checkpoint is loaded (on_load_checkpoint)
        #: the software versions of the run, one entry per start (set by train.py; saved in checkpoints)
        self.software_versions: list[dict] = []

    def forward(self, batch: dict) -> dict:
        return self.model(batch)

    #: losses kept on the device before they are copied to the host in one transfer
    PENDING_LOSSES = 1000

    @property
    def loss_history(self) -> list[float]:
        """The training loss of every batch so far (this rank's), as floats: for reports."""
        self._move_losses_to_host()
        return self._losses

    def _move_losses_to_host(self) -> None:
        if self._pending_losses:
            self._losses += torch.stack(self._pending_losses).double().tolist()  # one copy
            self._pending_losses.clear()

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict, dict]:
        """``(total loss, {term: loss}, model output)`` of a training batch: the computation of a training
        step without its logging (also run by ``bench/train_step.py``)."""
        if self.channels_last:  # the (B, 3, H, W) images
            batch = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                     for k, v in batch.items()}
        out = self.model(batch)
        source = batch.get("source", [None])[0]
        ce_weight = self.ce_weight_by_source.get(source, None)
        if ce_weight is not None:
            default, self.loss.ce_weight = self.loss.ce_weight, ce_weight
        try:
            total, terms = self.loss(out, batch)
        finally:
            if ce_weight is not None:
                self.loss.ce_weight = default
        return total, terms, out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, terms, out = self.compute_loss(batch)
        b = batch["query"].shape[0]
        value = total.detach().float()
        self._pending_losses.append(value)
        if len(self._pending_losses) >= self.PENDING_LOSSES:
            self._move_losses_to_host()
        self.log("train/loss", total, prog_bar=True, batch_size=b, on_step=True, on_epoch=True, sync_dist=True)
        # a smoothed training loss (EMA, half-life ~70 steps): a steadier "best" than the raw loss when no
        # benchmark callback is configured (the quickstart monitors it); computed on the device
        if self.loss_ema is None:
            self.loss_ema = value
        else:
            self.loss_ema = torch.lerp(torch.as_tensor(self.loss_ema, dtype=value.dtype, device=value.device),
                                       value, 1 - self.ema_decay)
        step_values = self._mean_over_ranks({"train/loss_ema": self.loss_ema} | {f"train/{k}": v for k, v in terms.items()})
        self.log_dict(step_values, batch_size=b, on_step=True, on_epoch=False)
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/pairs_per_s", b * self.trainer.world_size / (now - self._t_last), batch_size=b)
        self._t_last = now
        if self.log_images_every_n_steps and self.global_step % self.log_images_every_n_steps == 0 \
                and self.global_rank == 0 and self.global_step != self._last_image_step:
            self._last_image_step = self.global_step  # (gradient accumulation: several batches per step)
            self._log_warp_image(batch, out)
        return total

    def _mean_over_ranks(self, values: dict) -> dict:
        """``{name: scalar}`` -> ``{name: () float32 tensor}``, each the mean over the ranks, in one
        all-reduce (``self.log(..., sync_dist=True)`` would run one per value, about 20 per step)."""
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).detach().reshape(())
                               for v in values.values()])
        trainer = self._trainer  # (None when a step runs outside a Trainer)
        if trainer is not None and trainer.world_size > 1:
            stacked = trainer.strategy.reduce(stacked, reduce_op="mean")
        return dict(zip(values, stacked.unbind()))

    @torch.no_grad()
    def _log_warp_image(self, batch: dict, out: dict) -> None:
        fine = out[min(out)]
        flow = fine["dense_flow"][:1].permute(0, 2, 3, 1)
        cert = fine["dense_certainty"][:1, 0].sigmoid()
        gt, valid = gt_warp({k: v[:1] if torch.is_tensor(v) else v for k, v in batch.items()}, *flow.shape[1:3])
        img = warp_panel(batch["query"][0], batch["support"][0], flow[0], cert[0], gt[0].float(), valid[0])
        caption = "query | support | support warped by prediction x certainty | certainty | by ground truth"
        log_warp_image(self.logger, "train/warp", img, self.global_step, caption)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dkm_loss_ema"] = None if self.loss_ema is None else float(self.loss_ema)
        # the run's software versions, one entry per start (train.py sets them; versions.json holds the same)
        checkpoint["dkm_software_versions"] = list(self.software_versions)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loss_ema = checkpoint.get("dkm_loss_ema")
        # The LR schedule follows this run's config (configure_optimizers: milestones as fractions of this
        # run's trainer.max_steps, learning rates scaled by this run's world size), not the interrupted run's:
        # MultiStepLR's state holds both, and loading it would bring back the old ones (e.g. a run resumed
        # with more steps would decay the LR too early). Only the step count is restored; on_train_start
        # sets the learning rates the schedule gives at that step.
        for state in checkpoint.get("lr_schedulers", []):
            state.pop("milestones", None)
            state.pop("base_lrs", None)
        self._reset_lr_on_start = True

    def on_train_start(self) -> None:
        if not self._reset_lr_on_start:
            return
        self._reset_lr_on_start = False
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if not isinstance(sched, torch.optim.lr_scheduler.MultiStepLR):
                continue
            decays = bisect.bisect_right(sorted(sched.milestones.elements()), sched.last_epoch)
            restored = [g["lr"] for g in sched.optimizer.param_groups]
            for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
                group["initial_lr"], group["lr"] = base, base * sched.gamma ** decays
            sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
            if restored != sched._last_lr:
                log.info("resume at step %d: learning rates %s (this run's schedule; the checkpoint had %s)",
                         sched.last_epoch, sched._last_lr, restored)

    def configure_optimizers(self):
        o = self.optim
        scale = self.trainer.world_size if o.get("scale_lr_with_devices", True) else 1
        params = [{"params": self.model.encoder.parameters(), "lr": o["lr_encoder"] * scale, "name": "encoder"},
                  {"params": self.model.decoder.parameters(), "lr": o["lr_decoder"] * scale, "name": "decoder"}]
        opt = torch.optim.AdamW(params, weight_decay=o.get("weight_decay", 0.01))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self._milestones(), gamma=o.get("gamma", 0.2))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _milestones(self) -> list[int]:
        """Steps at which the LR decays: ``optim.milestones`` (fractions) of ``trainer.max_steps``."""
        total = self.trainer.max_steps
        if total is None or total < 0:
            raise ValueError("trainer.max_steps must be set: the LR milestones are fractions of it")
        return [int(f * total) for f in self.optim.get("milestones", (2 / 3, 9 / 10))]


def log_warp_image(logger, key: str, image, step: int, caption: str = "") -> None:
    """Log an (H, W, 3) uint8 image with whatever logger is attached (W&B, TensorBoard) or, for
    loggers without images (CSV), as a PNG in the logger's directory."""
    if logger is None:
        return
    name = type(logger).__name__
    if name == "WandbLogger":
        logger.log_image(key=key, images=[image], step=step, caption=[caption])
    elif name == "TensorBoardLogger":
        logger.experiment.add_image(key, image, step, dataformats="HWC")
    elif getattr(logger, "log_dir", None):
        from pathlib import Path

        from PIL import Image

        d = Path(logger.log_dir) / "images"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(d / f"{key.replace('/', '_')}_{step:08d}.png")
