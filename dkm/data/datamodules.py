"""LightningDataModule wiring the training datasets to loaders (the only Lightning code in data/)."""
from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, default_collate

from .homography import SKIMAGE_TRAIN, SyntheticHomographyDataset, skimage_images
from .megadepth import build_megadepth, scene_weights
from .samplers import WeightedEpochSampler
from .scannet import build_scannet

log = logging.getLogger(__name__)


class KeyedDataset(torch.utils.data.Dataset):
    """Adapts a dataset whose items are seeded by ``(index, epoch)``: sets ``epoch`` on the
    underlying scene datasets before reading the item, and tags it with its ``source``."""

    def __init__(self, dataset, source: str):
        self.dataset, self.source = dataset, source

    def __len__(self):
        return len(self.dataset)

    def _set_epoch(self, epoch):
        for d in getattr(self.dataset, "datasets", [self.dataset]):
            d.epoch = epoch

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        self._set_epoch(epoch)
        item = self.dataset[i]
        item["source"] = self.source
        return item


class _Samplers:
    """The samplers of several loaders behind one ``set_epoch``."""

    def __init__(self, samplers):
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)


class AlternatingLoader:
    """The training loader: one or several ``DataLoader``s (the indoor recipe: MegaDepth, ScanNet, ...),
    alternating batch by batch, that a run resumed mid-epoch continues where it stopped.

    ``sampler`` passes Lightning's per-epoch ``set_epoch`` on to every loader's sampler. ``state_dict``
    (saved by Lightning in every checkpoint, as for any loader with that interface) holds the epoch
    drawn and the number of batches handed out of it. After ``load_state_dict`` the next pass draws
    that epoch again, skipping those batches in the samplers (without reading them), or the next epoch
    if it had been handed out whole, so that a resumed run trains on the same sequence of batches as an
    uninterrupted one. The pass after a resume can be numbered differently by Lightning: a checkpoint
    written when ``max_steps`` or ``max_time`` stopped a run mid-epoch (``ModelCheckpoint`` saves
    ``last.ckpt`` at the end of training if it had not during the run) counts the interrupted epoch as
    done, and Lightning resumes with the next epoch number at the interrupted batch; the loader keeps
    the difference and draws epochs ``set_epoch + difference`` from then on.

    Every rank hands out the same number of batches, so rank 0's state (the one Lightning saves) fits
    every rank's share. The count is of batches handed to the training loop (which Lightning takes
    from a loader with a length one at a time, without prefetching) minus ``in_flight()``, the batches
    handed out whose training step has not finished: a checkpoint written in the middle of a step (a
    SLURM requeue signal) then resumes with that step's batch. ``tests/test_training.py`` checks the
    resumed sequences. Each loader needs a :class:`~dkm.data.samplers.WeightedEpochSampler` and
    ``drop_last=True``; resuming exactly assumes the data configuration of the interrupted run and
    epochs of ``len(self)`` batches (with ``trainer.limit_train_batches`` Lightning ends epochs early,
    and a checkpoint from such an epoch's end resumes the rest of that epoch's draw instead of the next).
    """

    def __init__(self, loaders: list[DataLoader], in_flight: Callable[[], int] | None = None):
        self.loaders, self.in_flight = loaders, in_flight
        self.sampler = _Samplers([x.sampler for x in loaders])
        self._epoch, self._yielded, self._epoch_offset = 0, 0, 0
        self._resume: dict | None = None

    def __len__(self):
        return min(len(x) for x in self.loaders) * len(self.loaders)

    def state_dict(self) -> dict:
        pending = self.in_flight() if self.in_flight is not None else 0
        return {"epoch": self._epoch, "batches": max(0, self._yielded - pending)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "batches"} - set(state)
        if missing:
            raise KeyError(f"AlternatingLoader.load_state_dict: the checkpoint's loader state lacks {sorted(missing)}"
                           f" (found {sorted(state)})")
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self):
        n_loaders = len(self.loaders)
        numbered = self.loaders[0].sampler.next_epoch()  # Lightning's set_epoch
        resume, self._resume = self._resume, None
        if resume is not None:
            epoch, done = resume["epoch"], resume["batches"]
            if done >= len(self):  # saved at the end of its epoch
                epoch, done = epoch + 1, 0
            self._epoch_offset = epoch - numbered
        else:
            epoch, done = numbered + self._epoch_offset, 0
        for k, loader in enumerate(self.loaders):  # batches of loader k among the first `done`: k, k + n, ...
            skipped = max(0, (done - k + n_loaders - 1) // n_loaders)
            loader.sampler.resume(epoch, skipped * loader.batch_size)
        its = [iter(x) for x in self.loaders]
        self._epoch, self._yielded = epoch, done
        for position in range(done, len(self)):
            batch = next(its[position % n_loaders])
            self._yielded = position + 1
            yield batch


def collate(items: list[dict]) -> dict:
    """Default collation, with string fields kept as lists."""
    strings = {k: [it[k] for it in items] for k, v in items[0].items() if isinstance(v, str)}
    rest = default_collate([{k: v for k, v in it.items() if k not in strings} for it in items])
    return rest | strings


class DKMDataModule(pl.LightningDataModule):
    """Training data from a ``conf/data/*.yaml`` config.

    ``sources`` is a list of ``{kind: megadepth|scannet|synthetic_homography, ...kwargs}``; each
    source gives one loader, and :class:`AlternatingLoader` alternates them batch by batch (and
    resumes mid-epoch). Each source is sampled by
    :class:`WeightedEpochSampler` (scene weights ``1 / n^scene_alpha`` for MegaDepth/ScanNet),
    ``samples_per_epoch`` items per epoch over all ranks.
    """

    def __init__(self, sources: list[dict], h: int, w: int, batch_size: int = 8, samples_per_epoch: int = 10000,
                 num_workers: int = 4, pin_memory: bool = True, persistent_workers: bool = True, seed: int = 0,
                 scene_alpha: float = 0.75, shake_t: int = 32, rot_prob: float = 0.0):
        super().__init__()
        self.sources, self.h, self.w = [dict(s) for s in sources], h, w
        self.batch_size, self.samples_per_epoch = batch_size, samples_per_epoch
        self.num_workers, self.pin_memory, self.persistent_workers = num_workers, pin_memory, persistent_workers
        self.seed, self.scene_alpha, self.shake_t, self.rot_prob = seed, scene_alpha, shake_t, rot_prob
        self.datasets: list[tuple[KeyedDataset, torch.Tensor]] = []

    def build_source(self, src: dict):
        src = dict(src)
        kind = src.pop("kind")
        common = {"h": self.h, "w": self.w, "seed": self.seed}
        if kind == "megadepth":
            ds = build_megadepth(src.pop("data_root"), shake_t=src.pop("shake_t", self.shake_t),
                                 rot_prob=src.pop("rot_prob", self.rot_prob), **common, **src)
            return ds, scene_weights(ds, self.scene_alpha)
        if kind == "scannet":
            ds = build_scannet(src.pop("data_root"), shake_t=src.pop("shake_t", 0), **common, **src)
            return ds, scene_weights(ds, self.scene_alpha)
        if kind == "synthetic_homography":
            names = src.pop("images", SKIMAGE_TRAIN)
            ds = SyntheticHomographyDataset(skimage_images(names), length=src.pop("length", self.samples_per_epoch),
                                            **common, **src)
            return ds, torch.ones(len(ds))
        raise ValueError(f"unknown data source kind {kind!r} (megadepth, scannet, synthetic_homography)")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for src in self.sources:  # fails here, before training, on missing/partial trees
            ds, weights = self.build_source(src)
            self.datasets.append((KeyedDataset(ds, src["kind"]), weights))
            log.info("data source %s: %d pairs", src["kind"], len(ds))

    def _loader(self, ds, weights) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        per_source = self.samples_per_epoch // len(self.datasets)
        sampler = WeightedEpochSampler(weights, per_source, seed=self.seed, rank=rank, world_size=world)
        if len(sampler) < self.batch_size:  # drop_last: not one batch, Lightning would skip training
            raise ValueError(
                f"data.module.samples_per_epoch={self.samples_per_epoch} over {len(self.datasets)} data source(s) "
                f"and {world} device(s) gives {len(sampler)} pairs per source and device, fewer than "
                f"data.module.batch_size={self.batch_size}: set samples_per_epoch to at least "
                f"{self.batch_size * world * len(self.datasets)}")
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.persistent_workers and self.num_workers > 0,
                          collate_fn=collate, drop_last=True)

    def train_dataloader(self):
        loaders = [self._loader(ds, w) for ds, w in self.datasets]
        return AlternatingLoader(loaders, in_flight=self._steps_in_flight)

    def _steps_in_flight(self) -> int:
        """Training batches fetched whose step has not finished (0 or 1): Lightning's progress counters."""
        try:
            progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        except AttributeError:  # no trainer attached
            return 0
        return max(0, progress.ready - progress.processed)
