"""Training data, a few optimisation steps, checkpoints, resume and export (tiny, on CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dkm import dkm_small
from dkm.data.datamodules import DKMDataModule, collate
from dkm.data.homography import SyntheticHomographyDataset, skimage_images
from dkm.data.megadepth import build_megadepth, scene_weights
from dkm.data.samplers import WeightedEpochSampler
from dkm.data.scannet import build_scannet
from dkm.geometry.warp import gt_warp
from dkm.lightning.checkpoint_io import AtomicCheckpointIO, export_weights
from dkm.lightning.module import DKMLightningModule
from dkm.losses import DKMLoss
from synthetic_scenes import make_megadepth_scene, make_scannet_scene

TINY = {"arch": "dkm_small", "h": 64, "w": 96, "fast": True, "weights": None, "pretrained": False,
        "backbone_weights": None}


def photo_error(batch, shift_px: float = 0.0) -> float:
    """Mean |query - support(warp)| over valid pixels; ``shift_px`` perturbs the warp."""
    h, w = batch["query"].shape[-2:]
    warp, valid = gt_warp(batch, h, w)
    warp = warp.float() + torch.tensor([2 * shift_px / w, 0.0])
    pulled = F.grid_sample(batch["support"], warp, mode="bilinear", align_corners=False)
    err = (pulled - batch["query"]).abs().mean(1)
    return float(err[valid].mean()), float(valid.float().mean())


@pytest.mark.parametrize("kind", ["megadepth", "scannet"])
def test_depth_datasets_give_consistent_ground_truth(tmp_path, kind):
    if kind == "megadepth":
        ds = build_megadepth(make_megadepth_scene(tmp_path), exclude_scenes=(), h=96, w=128, shake_t=8)
    else:
        ds = build_scannet(make_scannet_scene(tmp_path), h=96, w=128)
    assert len(ds) >= 2
    batch = collate([ds[0], ds[1]])
    assert batch["query"].shape == (2, 3, 96, 128) and batch["query_depth"].shape == (2, 96, 128)
    err, frac = photo_error(batch)
    err_shifted, _ = photo_error(batch, shift_px=1.0)
    assert frac > 0.3
    # the support image pulled back through the ground-truth warp reproduces the query, and a one-pixel
    # error in the convention would be visible
    assert err < 0.15 and err_shifted > 1.5 * err, (err, err_shifted)


def test_homography_dataset_ground_truth_is_consistent():
    ds = SyntheticHomographyDataset(skimage_images(["astronaut"]), h=96, w=128, length=4, photometric=0.0)
    batch = collate([ds[0], ds[1]])
    err, frac = photo_error(batch)
    err_shifted, _ = photo_error(batch, shift_px=1.0)
    assert frac > 0.5 and err < 0.2 and err_shifted > 1.3 * err


def test_missing_or_corrupt_data_fails_with_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="prep_scene_info"):
        build_megadepth(tmp_path / "nothing")
    root = make_megadepth_scene(tmp_path / "mega")
    ds = build_megadepth(root, exclude_scenes=(), h=64, w=96)
    victim = root / ds.datasets[0].image_paths[0]
    victim.write_bytes(b"garbage")
    with pytest.raises(OSError, match=str(victim.name)):
        ds[0]
    dm = DKMDataModule([{"kind": "scannet", "data_root": str(tmp_path / "nope")}], h=64, w=96)
    with pytest.raises(FileNotFoundError, match="scannet_indices"):
        dm.setup("fit")


def test_weighted_sampler_is_rank_consistent_and_disjoint():
    w = torch.tensor([1.0] * 10 + [0.1] * 10)
    full = list(WeightedEpochSampler(w, 11, seed=1))
    parts = [list(WeightedEpochSampler(w, 11, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 6
    got = [k[0] for p in parts for k in p]
    assert set(got) == {k[0] for k in full} and len({k[0] for k in full}) == 11
    s = WeightedEpochSampler(w, 11, seed=1)
    s.set_epoch(1)
    assert [k[0] for k in s] != [k[0] for k in full] and all(k[1] == 1 for k in s)
    ws = scene_weights(torch.utils.data.ConcatDataset([range(4), range(16)]), alpha=0.75)
    np.testing.assert_allclose(ws[:4].numpy(), 4 ** -0.75) and np.testing.assert_allclose(ws[4:].numpy(), 16 ** -0.75)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = dkm_small(h=64, w=96).train()
    ds = SyntheticHomographyDataset(skimage_images(["astronaut", "coffee"]), h=64, w=96, length=2, seed=3)
    batch = collate([ds[0], ds[1]])
    loss_fn = DKMLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    losses = []
    for _ in range(12):
        total, _ = loss_fn(model(batch), batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


class _FirstStep(pl.Callback):
    def __init__(self):
        self.first = None

    def on_train_batch_start(self, trainer, *args):
        if self.first is None:
            self.first = trainer.global_step


def _trainer(tmp_path, max_steps, extra=()):
    ck = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, every_n_train_steps=1)
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      callbacks=[ck, *extra], plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path)), ck


def test_lightning_fit_resume_and_export(tmp_path):
    pl.seed_everything(0)
    dm = DKMDataModule([{"kind": "synthetic_homography", "images": ["astronaut"], "length": 8}], h=64, w=96,
                       batch_size=2, samples_per_epoch=8, num_workers=0, persistent_workers=False)
    optim = {"lr_encoder": 1e-4, "lr_decoder": 1e-4, "weight_decay": 0.01, "milestones": [0.5, 0.9], "gamma": 0.2}
    module = DKMLightningModule(TINY, {"ce_weight": 0.01}, optim, log_images_every_n_steps=0)
    trainer, ck = _trainer(tmp_path, 3)
    trainer.fit(module, datamodule=dm)
    last = tmp_path / "ck" / "last.ckpt"
    assert last.exists() and trainer.global_step == 3
    assert not list((tmp_path / "ck").glob(".*tmp*"))  # atomic writes leave no temporaries
    # resume: continues at the saved step, with optimiser and scheduler state
    first = _FirstStep()
    module2 = DKMLightningModule(TINY, {"ce_weight": 0.01}, optim, log_images_every_n_steps=0)
    trainer2, _ = _trainer(tmp_path, 5, [first])
    trainer2.fit(module2, datamodule=dm, ckpt_path=str(last))
    assert first.first == 3 and trainer2.global_step == 5
    assert trainer2.lr_scheduler_configs[0].scheduler.last_epoch == 5
    # export to the upstream layout and load it through the zoo
    out = tmp_path / "exported.pth"
    export_weights(tmp_path / "ck" / "last.ckpt", out)
    loaded = dkm_small(h=64, w=96, weights=out)
    for k, v in module2.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
