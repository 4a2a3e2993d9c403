"""Training data, a few optimisation steps, checkpoints, resume and export (tiny, on CPU)."""
from __future__ import annotations

import ast
import csv
import logging
import math
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dkm import build_model, dkm_small
from dkm.data.datamodules import DKMDataModule, collate
from dkm.data.homography import SyntheticHomographyDataset, skimage_images
from dkm.data.megadepth import build_megadepth, scene_weights
from dkm.data.samplers import WeightedEpochSampler
from dkm.data.scannet import build_scannet
from dkm.geometry.warp import gt_warp
from dkm.lightning.checkpoint_io import AtomicCheckpointIO
from dkm.lightning.export import main as export_main
from dkm.lightning.module import DKMLightningModule
from dkm.losses import DKMLoss
from synthetic_scenes import make_megadepth_scene, make_scannet_scene

#: dkm_small's code with the narrowest decoder and refiners it allows (depthwise refiners need hidden
#: widths that are multiples of their input width): one training step takes ~0.2 s on 2 cores.
TINY_ARCH = {"proj_dim": 32, "gp_dim": 32, "feat_dim": 32, "dfn_dim": 64,
             "refiner_hidden": {16: 64, 8: 256, 4: 128, 2: 128, 1: 12}, "refiner_blocks": 1}
TINY = {"arch": "dkm_small", "h": 64, "w": 96, "fast": True, "weights": None, "pretrained": False,
        "backbone_weights": None, **TINY_ARCH}


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


def test_in_plane_rotation_augmentation_keeps_the_ground_truth_exact(tmp_path):
    # rot_prob=1: every query rotated (kornia, about the image centre) with the rotation folded into K1; the
    # support pulled back through the ground truth still reproduces the rotated query, and half a pixel of
    # error in that folding would show (0.5 px: about 2.5x the photometric error here)
    root = make_megadepth_scene(tmp_path)
    plain = build_megadepth(root, exclude_scenes=(), h=96, w=128, shake_t=8)
    rotated = build_megadepth(root, exclude_scenes=(), h=96, w=128, shake_t=8, rot_prob=1.0)
    for i in range(2):
        a, b = collate([plain[i]]), collate([rotated[i]])
        assert not torch.allclose(a["query"], b["query"]) and torch.equal(a["support"], b["support"])
        err, frac = photo_error(b)
        err_half, _ = photo_error(b, shift_px=0.5)
        assert frac > 0.5 and err < 1.2 * photo_error(a)[0] and err_half > 2 * err, (err, err_half)


def test_homography_dataset_ground_truth_is_consistent():
    ds = SyntheticHomographyDataset(skimage_images(["astronaut"]), h=96, w=128, length=4, photometric=0.0)
    batch = collate([ds[0], ds[1]])
    err, frac = photo_error(batch)
    err_shifted, _ = photo_error(batch, shift_px=1.0)
    assert frac > 0.5 and err < 0.2 and err_shifted > 1.3 * err


def test_homography_ground_truth_is_exact_at_pixel_centres(monkeypatch):
    import dkm.data.homography as homography

    # to_center_half, by hand: a scaling by 2 about OpenCV's integer pixel (0, 0) fixes that pixel's centre,
    # which is at 0.5 in the i + 0.5 frame, and sends pixel 1 (centre 1.5) to pixel 2 (centre 2.5)
    Hs = homography.to_center_half(np.diag([2.0, 2.0, 1.0]))
    np.testing.assert_allclose(Hs @ [0.5, 0.5, 1.0], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(Hs @ [1.5, 1.5, 1.0], [2.5, 2.5, 1.0])
    # the dataset's ground truth for a known warp of OpenCV's (integer-centre) frame: query pixel (i, j) goes to
    # u = 1.1 j + 3, v = 0.9 i - 2, i.e. to normalized x = (2u + 1) / W - 1, y = (2v + 1) / H - 1
    H = np.array([[1.1, 0.0, 3.0], [0.0, 0.9, -2.0], [0.0, 0.0, 1.0]])
    monkeypatch.setattr(homography, "random_homography", lambda *a, **k: H)
    h, w = 24, 32
    ds = SyntheticHomographyDataset(skimage_images(["astronaut"]), h=h, w=w, length=1, photometric=0.0)
    warp, valid = gt_warp(collate([ds[0]]), h, w)
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    expected = np.stack([(2 * (1.1 * j + 3.0) + 1) / w - 1, (2 * (0.9 * i - 2.0) + 1) / h - 1], axis=-1)
    np.testing.assert_allclose(warp[0].double().numpy(), expected, atol=1e-5)
    inside = (np.abs(expected) < 1).all(-1)
    assert valid[0].numpy().sum() > 0.5 * h * w and (valid[0].numpy() <= inside).all()


def test_missing_or_corrupt_data_fails_with_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="prep_scene_info"):
        build_megadepth(tmp_path / "nothing")
    root = make_megadepth_scene(tmp_path / "mega")
    ds = build_megadepth(root, exclude_scenes=(), h=64, w=96)
    victim = root / ds.datasets[0].image_paths[0]
    victim.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=re.escape(str(victim)) + " is not a readable image"):
        ds[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"image file not found: {victim}")):
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
    np.testing.assert_allclose(ws[:4].numpy(), 4 ** -0.75)
    np.testing.assert_allclose(ws[4:].numpy(), 16 ** -0.75)


def test_sampler_and_loader_resume_mid_epoch_where_they_stopped():
    from dkm.data.datamodules import AlternatingLoader

    w = torch.ones(20)
    full = [k for k in WeightedEpochSampler(w, 11, seed=2, rank=1, world_size=2)]
    s = WeightedEpochSampler(w, 11, seed=2, rank=1, world_size=2)
    s.set_epoch(0)
    s.resume(0, 4)
    assert list(s) == full[4:] and list(s) == full  # one pass only
    s.set_epoch(1)
    s.resume(0, 2)  # whatever set_epoch said
    assert list(s) == full[2:] and list(s)[0][1] == 1
    with pytest.raises(ValueError, match="outside"):
        s.resume(0, 7)

    class Keys(torch.utils.data.Dataset):
        def __init__(self, tag):
            self.tag = tag

        def __getitem__(self, key):
            return {"key": self.tag * 1000 + key[0], "epoch": key[1]}

    def loader():  # two sources of different lengths (4 and 3 batches of 2), alternating
        dls = [torch.utils.data.DataLoader(Keys(t), batch_size=2, drop_last=True,
                                           sampler=WeightedEpochSampler(torch.ones(30), n, seed=t))
               for t, n in ((1, 8), (2, 7))]
        return AlternatingLoader(dls)

    def run(dl, epoch, stop=None):
        dl.sampler.set_epoch(epoch)
        out = []
        for b in dl:
            out.append(b["key"].tolist())
            if len(out) == stop:
                break
        return out

    ref = loader()
    whole = run(ref, 3)
    assert len(whole) == len(ref) == 6 and run(ref, 3) == whole
    for stop in range(1, 6):
        first = loader()
        head = run(first, 3, stop)
        state = first.state_dict()
        assert state == {"epoch": 3, "batches": stop}
        resumed = loader()
        resumed.load_state_dict(state)
        assert head + run(resumed, 3) == whole, stop
        assert run(resumed, 3) == whole  # the next pass is whole again
    resumed = loader()
    resumed.load_state_dict({"epoch": 2, "batches": 6})  # saved at the end of epoch 2: epoch 3 is whole
    assert run(resumed, 3) == whole
    # Lightning numbers the resumed pass one higher when the checkpoint was written at the end of
    # training (max_steps/max_time) mid-epoch: the rest of the saved epoch, then epochs shifted by one
    resumed = loader()
    resumed.load_state_dict({"epoch": 3, "batches": 2})
    assert run(resumed, 4) == whole[2:] and run(resumed, 5) == run(ref, 4) != whole
    with pytest.raises(KeyError, match="batches"):
        loader().load_state_dict({"epoch": 3})


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = dkm_small(h=64, w=96, **TINY_ARCH).train()
    ds = SyntheticHomographyDataset(skimage_images(["astronaut", "coffee"]), h=64, w=96, length=2, seed=3)
    batch = collate([ds[0], ds[1]])
    loss_fn = DKMLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    losses = []
    for _ in range(15):
        total, _ = loss_fn(model(batch), batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


class _FirstStep(pl.Callback):
    """Records the first global step and a fingerprint of every batch trained on."""

    def __init__(self):
        self.first, self.batches = None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = trainer.global_step
        self.batches.append(round(float(batch["query"].double().sum()), 6))


class _StopAt(pl.Callback):
    """Stops training after ``step`` steps, as an interruption (e.g. ``max_time``) would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class _SaveMidStep(pl.Callback):
    """Writes a checkpoint in the middle of step ``step`` (after its backward pass, before its
    optimiser step), as Lightning's SLURM requeue signal handler can."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _trainer(tmp_path, max_steps, extra=(), every_n_train_steps=1):
    """A CPU Trainer with train.py's checkpoint callbacks (last.ckpt every ``every_n_train_steps`` and at
    the end) and atomic writes."""
    from dkm.lightning.train import build_checkpoints

    last, _ = build_checkpoints({"every_n_train_steps": every_n_train_steps}, tmp_path / "ck")
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      callbacks=[last, *extra], plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path)), last


def test_lightning_fit_resume_and_export(tmp_path, recwarn, caplog):
    def data(workers=0):  # epochs of 4 batches of 2
        return DKMDataModule([{"kind": "synthetic_homography", "images": ["astronaut"], "length": 8}], h=64, w=96,
                             batch_size=2, samples_per_epoch=8, num_workers=workers, persistent_workers=workers > 0)

    optim = {"lr_encoder": 1e-4, "lr_decoder": 1e-4, "weight_decay": 0.01, "milestones": [0.5, 0.9], "gamma": 0.2}

    def fit(root, stop, ckpt=None, workers=0, every_n_train_steps=1, max_steps=9, extra=()):
        """Trains in ``root`` (a new directory per run, as train.py does) until step ``stop``; returns the
        trainer, the module and the batches trained on."""
        start = 0 if ckpt is None else torch.load(ckpt, weights_only=False)["global_step"]
        seen = _FirstStep()
        module = DKMLightningModule(TINY, {"ce_weight": 0.01}, optim, log_images_every_n_steps=0)
        trainer, _ = _trainer(root, max_steps, [seen, _StopAt(stop), *extra], every_n_train_steps)
        trainer.fit(module, datamodule=data(workers), ckpt_path=ckpt)
        assert trainer.global_step == stop and seen.first == start
        return trainer, module, seen.batches

    pl.seed_everything(0)
    _, whole, uninterrupted = fit(tmp_path / "uninterrupted", 9)
    assert len(set(uninterrupted)) == 9  # every epoch draws and augments anew: a repeated batch would show
    pl.seed_everything(0)
    _, _, batches = fit(tmp_path / "a", 3)
    assert not list((tmp_path / "a" / "ck").glob(".*tmp*"))  # atomic writes leave no temporaries
    # resumed mid-epoch (step 3 of 4), here with loader workers, from a checkpoint of that step's end; this run
    # saves at step 4 and, stopped at step 5 (in epoch 1) between saves, writes last.ckpt at the end of training,
    # which Lightning counts as epoch 1's end
    batches += fit(tmp_path / "b", 5, tmp_path / "a" / "ck" / "last.ckpt", workers=2, every_n_train_steps=4)[2]
    assert torch.load(tmp_path / "b" / "ck" / "last.ckpt", weights_only=False)["global_step"] == 5
    trainer, module2, more = fit(tmp_path / "c", 9, tmp_path / "b" / "ck" / "last.ckpt")  # the rest of epoch 1, epoch 2
    batches += more
    assert batches == uninterrupted  # the batches of the uninterrupted run, in its order
    assert not [w for w in recwarn.list if "not resumable" in str(w.message)]
    # training is deterministic on CPU: the same batches, optimiser and LR schedule give the same weights
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 9
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(module2.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # a checkpoint written in the middle of step 2 (as on a SLURM requeue signal) resumes with step 2's batch;
    # the parameters end as in the uninterrupted run (BatchNorm's running statistics not quite: the checkpoint
    # holds the interrupted step's forward update of them, and the redone step applies it again)
    pl.seed_everything(0)
    mid = tmp_path / "mid_step.ckpt"
    batches = fit(tmp_path / "e", 3, every_n_train_steps=100, extra=[_SaveMidStep(2, mid)])[2][:2]
    _, module3, more = fit(tmp_path / "f", 9, mid)
    assert batches + more == uninterrupted
    params = dict(module3.named_parameters())
    for k, v in whole.named_parameters():
        torch.testing.assert_close(params[k], v, rtol=0, atol=0, msg=k)
    # resumed with more steps, the LR schedule follows this run's max_steps (milestones at 0.5 and 0.9 of 20:
    # steps 10 and 18), not the checkpoint's (steps 4 and 8, where the LR had already decayed twice)
    longer = fit(tmp_path / "d", 10, tmp_path / "c" / "ck" / "last.ckpt", max_steps=20)[0]
    assert sorted(longer.lr_scheduler_configs[0].scheduler.milestones.elements()) == [10, 18]
    assert [g["lr"] for g in longer.optimizers[0].param_groups] == pytest.approx([1e-4 * 0.2] * 2)
    # export to the upstream layout and load it through the zoo
    out = tmp_path / "exported.pth"
    with caplog.at_level(logging.INFO, logger="dkm.lightning.export"):
        export_main([str(tmp_path / "c" / "ck" / "last.ckpt"), str(out)])
    sd = torch.load(out, weights_only=True)
    # the .pth holds no config: the log says how the model was built, as a call that rebuilds it exactly
    hint = next(r.getMessage() for r in caplog.records if "holds the weights only" in r.getMessage())
    assert "trained as dkm_small at 64x96" in hint
    rebuilt = build_model(ast.literal_eval(hint.split("dkm.build_model(", 1)[1].split("), or use", 1)[0]))
    assert (rebuilt.h_resized, rebuilt.w_resized) == (64, 96)
    for k, v in module2.model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v)
    assert not any(k.startswith("model.") for k in sd) and set(sd) == set(module2.model.state_dict())
    loaded = dkm_small(h=64, w=96, weights=out, **TINY_ARCH)
    for k, v in module2.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


class _Layouts(pl.Callback):
    """Records, per step, whether the images the model saw and the first convolution's gradient are
    channels-last."""

    def __init__(self):
        self.images, self.grads = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        conv1 = pl_module.model.encoder.backbone.conv1
        self.hook = conv1.register_forward_pre_hook(
            lambda m, args: self.images.append(args[0].is_contiguous(memory_format=torch.channels_last)))

    def on_after_backward(self, trainer, pl_module):
        self.hook.remove()
        grad = pl_module.model.encoder.backbone.conv1.weight.grad
        self.grads.append(grad.is_contiguous(memory_format=torch.channels_last))


def test_channels_last_training_is_the_same_computation_in_nhwc(tmp_path):
    optim = {"lr_encoder": 1e-4, "lr_decoder": 1e-4, "milestones": [0.5, 0.9]}
    runs = {}
    for channels_last in (False, True):
        pl.seed_everything(0)
        module = DKMLightningModule(TINY, {"ce_weight": 0.01}, optim, log_images_every_n_steps=0,
                                    channels_last=channels_last)
        layouts = _Layouts()
        trainer, _ = _trainer(tmp_path / str(channels_last), 3, [layouts])
        data = DKMDataModule([{"kind": "synthetic_homography", "images": ["astronaut"], "length": 6}], h=64, w=96,
                             batch_size=2, samples_per_epoch=6, num_workers=0)
        trainer.fit(module, datamodule=data)
        runs[channels_last] = module, layouts
    (plain, plain_layouts), (nhwc, nhwc_layouts) = runs[False], runs[True]
    assert plain_layouts.images == plain_layouts.grads == [False] * 3
    assert nhwc_layouts.images == nhwc_layouts.grads == [True] * 3  # the option is in effect at every step
    assert nhwc.model.decoder.conv_refiner["4"].block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    # the same computation up to rounding: the first step (same weights, same batch) to float32 rounding as the
    # GP amplifies it (1e-6 here), the later ones a little further apart (AdamW's normalised updates of near-zero
    # gradients differ); a layout bug (e.g. a permuted view) would move the loss by tens of percent
    assert nhwc.loss_history[0] == pytest.approx(plain.loss_history[0], rel=1e-4)
    assert nhwc.loss_history == pytest.approx(plain.loss_history, rel=1e-2)
    # its export has the release's (contiguous) layout and loads through the zoo
    out = tmp_path / "nhwc.pth"
    export_main([str(tmp_path / "True" / "ck" / "last.ckpt"), str(out)])
    sd = torch.load(out, weights_only=True)
    assert all(v.is_contiguous() for v in sd.values())
    loaded = dkm_small(h=64, w=96, weights=out, **TINY_ARCH)
    for k, v in nhwc.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_scene_info_npz_partial_tree_and_depth_interpolation(tmp_path):
    root = make_megadepth_scene(tmp_path / "mega", n_pairs=2)
    info = np.load(root / "prep_scene_info" / "0001.npy", allow_pickle=True).item()
    (root / "prep_scene_info" / "0001.npy").unlink()
    np.savez(root / "prep_scene_info" / "0001.npz", **info)  # the same scene info as .npz
    for mode in ("bilinear", "nearest"):
        ds = build_megadepth(root, exclude_scenes=(), h=96, w=128, depth_interpolation=mode)
        err, frac = photo_error(collate([ds[0], ds[1]]))
        assert frac > 0.3 and err < 0.15, (mode, err, frac)
    assert len(ds) == 4  # 2 pairs x 2 overlap bands
    with pytest.raises(FileNotFoundError, match="no training scene infos"):
        build_megadepth(root, exclude_scenes=("0001",))  # the held-out list is honoured
    # a partial tree (one scene's depth folder never extracted) fails at setup, naming the folder
    import shutil

    depth_dir = root / ds.datasets[0].depth_paths[0]
    shutil.rmtree(depth_dir.parent)
    with pytest.raises(FileNotFoundError, match=str(depth_dir.parent.name)):
        build_megadepth(root, exclude_scenes=())
    sroot = make_scannet_scene(tmp_path / "scannet", n_pairs=2)
    (sroot / "scans" / "scans_train" / "scene0000_00" / "pose" / "10.txt").unlink()
    build_scannet(sroot)  # the pose folder still exists: "dirs" passes...
    with pytest.raises(FileNotFoundError, match="10.txt"):
        build_scannet(sroot, check="all")  # ... "all" names the missing file


def test_depth_resize_modes_by_hand():
    from dkm.data.pairs import resize_depth

    depth = torch.tensor([[2.0, 0.0]])  # a valid depth next to a hole, upsampled to 4 columns
    # bilinear, pixel centres (align_corners=False): samples at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
    torch.testing.assert_close(resize_depth(depth, 1, 4, "bilinear"), torch.tensor([[2.0, 1.5, 0.5, 0.0]]))
    torch.testing.assert_close(resize_depth(depth, 1, 4, "nearest"), torch.tensor([[2.0, 2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="depth_interpolation must be one of"):
        resize_depth(depth, 1, 4, "bicubic")


def test_indoor_recipe_alternates_sources_and_weights_the_bce(tmp_path):
    mroot, sroot = make_megadepth_scene(tmp_path / "mega"), make_scannet_scene(tmp_path / "scannet")
    dm = DKMDataModule([{"kind": "megadepth", "data_root": str(mroot), "exclude_scenes": []},
                        {"kind": "scannet", "data_root": str(sroot)}], h=64, w=96, batch_size=1,
                       samples_per_epoch=4, num_workers=0, persistent_workers=False)
    dm.setup("fit")
    sources = [b["source"][0] for b in dm.train_dataloader()]
    assert sources == ["megadepth", "scannet", "megadepth", "scannet"]
    # Lightning's per-epoch set_epoch (also after a resume) reaches every source's sampler
    from lightning_fabric.utilities.data import _set_sampler_epoch

    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 7)
    assert [x.sampler.epoch for x in loader.loaders] == [7, 7]
    assert [b["source"][0] for b in loader] == ["megadepth", "scannet", "megadepth", "scannet"]  # still alternates
    module = DKMLightningModule(TINY, {"ce_weight": 0.01, "ce_weight_by_source": {"scannet": 0.0}},
                                {"lr_encoder": 1e-4, "lr_decoder": 1e-4}, log_images_every_n_steps=0)
    batch = next(iter(dm.train_dataloader()))
    out = {1: {"dense_flow": torch.zeros(1, 2, 8, 12), "dense_certainty": torch.full((1, 1, 8, 12), 3.0)}}
    seen = []
    module.loss.register_forward_hook(lambda m, i, o: seen.append(m.ce_weight))
    del module.model
    module.model = lambda b: out  # only the loss weighting is under test here
    module.log = module.log_dict = lambda *a, **k: None
    for src in ("megadepth", "scannet"):
        module._t_last = None
        module.training_step(batch | {"source": [src]}, 0)
    assert seen == [0.01, 0.0] and module.loss.ce_weight == 0.01


def test_hydra_configs_compose_with_the_recipe_values():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        base = compose("train")
        quick = compose("train", overrides=["experiment=quickstart"])
        indoor = compose("train", overrides=["experiment=indoor"])
    assert base.optim.lr_encoder == 5e-6 and base.optim.lr_decoder == 1e-4 and base.optim.weight_decay == 0.01
    assert base.loss.ce_weight == 0.01 and base.data.module.batch_size == 8 and base.optim.gamma == 0.2
    # the recipe's length: 8M pairs, N = 32 * 250000 // (8 * gpus) steps; milestones at 2/3 and 9/10 of them
    from dkm.lightning.train import training_steps

    assert base.trainer.max_steps is None and base.total_pairs == 32 * 250_000
    assert [training_steps(base.total_pairs, base.data.module.batch_size, g) for g in (1, 4, 8)] == \
        [1_000_000, 250_000, 125_000]
    assert int(base.optim.milestones[0] * 250_000) == 2 * 250_000 // 3
    assert base.logger.kind == "wandb" and base.seed == 0
    assert OmegaConf.to_container(quick, resolve=True)["data"]["module"]["h"] == quick.model.h
    assert quick.model.arch == "dkm_small" and quick.trainer.accelerator == "cpu" and quick.final_eval is not None
    assert [s.kind for s in indoor.data.module.sources] == ["megadepth", "scannet"]
    assert dict(indoor.loss.ce_weight_by_source) == {"scannet": 0.0}
    # held-out MegaDepth scenes: by default DKM's test scenes, every benchmark's scenes and LoFTR's dropped
    # ones; the DKMv3 recipes as their scripts (DKM's test scenes trained on)
    from dkm.data.megadepth import HELD_OUT_SCENES, IMC21_SCENES, MEGADEPTH1500_SCENES, TEST_SCENES
    from dkm.benchmarks.megadepth1500 import EIGHT_SCENES

    def held_out(c):
        resolved = OmegaConf.to_container(c, resolve=True)["data"]["module"]["sources"]
        return {src["kind"]: set(src.get("exclude_scenes", [])) for src in resolved}["megadepth"]

    assert held_out(base) == held_out(indoor) == set(HELD_OUT_SCENES) and len(HELD_OUT_SCENES) == 27
    eight = {n.split("_")[3] for n in EIGHT_SCENES}
    assert eight == set(IMC21_SCENES)  # the benchmark's scenes are never trained on
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        for exp in ("dkmv3_outdoor", "dkmv3_indoor"):
            cfg = compose("train", overrides=[f"experiment={exp}", "data.module.sources.0.data_root=/mega"])
            v3 = held_out(cfg)
            assert v3 == set(HELD_OUT_SCENES) - set(TEST_SCENES) and set(MEGADEPTH1500_SCENES) <= v3
            # validation as the scripts: MegadepthDenseBenchmark of 4000 pairs of the training tree after
            # every 150k pairs, on the model they trained (no upsampling pass)
            val = OmegaConf.to_container(cfg, resolve=True)["callbacks"]
            chunk = {"dkmv3_outdoor": 150_000, "dkmv3_indoor": 2 * 150_000}[exp]  # the scripts' k steps (x2 indoor)
            assert list(val) == ["megadepth_dense"] and cfg.data.module.samples_per_epoch == chunk
            assert (val["megadepth_dense"]["data_root"], val["megadepth_dense"]["every_n_epochs"],
                    val["megadepth_dense"]["every_n_steps"]) == ("/mega", 1, None)
            bench = val["megadepth_dense"]["benchmark"]
            assert (bench["num_pairs"], bench["scenes"], bench["upsample_preds"]) == (4000, ["0015", "0022"], False)
            assert not compose("train", overrides=[f"experiment={exp}", "callbacks=[]"]).get("callbacks")
            other = compose("train", overrides=[f"experiment={exp}", "callbacks=[hpatches_dense]"]).callbacks
            assert list(other) == ["hpatches_dense"] and other.hpatches_dense.every_n_steps == 5000
            # the v11 HPatches protocol (cycle consistency) in its DKMv3 version
            v3_homog = compose("train", overrides=[f"experiment={exp}", "callbacks=[hpatches]",
                                                   "benchmark@callbacks.hpatches.benchmark=hpatches_dkmv3"])
            assert v3_homog.callbacks.hpatches.benchmark.cycle_consistency is False
        assert "callbacks" not in base and "callbacks" not in quick


def test_wandb_goes_offline_by_itself(tmp_path, monkeypatch, caplog):
    from dkm.lightning.loggers import build_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with caplog.at_level("WARNING", logger="dkm.lightning.loggers"):
        logger = build_logger({"kind": "wandb", "project": "dkm", "name": "t"}, tmp_path)
    assert logger._offline
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "offline" in lines[0] and "\n" not in lines[0]


def test_training_length_follows_the_recipe_for_any_number_of_devices(tmp_path):
    """trainer.max_steps null: total_pairs / (batch size x world size) steps (the recipe's
    N = 32 * 250000 // (8 * gpus)); an explicit trainer.max_steps wins."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dkm.lightning.train import build_trainer

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        two = compose("train", overrides=["logger=none", "trainer.accelerator=cpu", "trainer.devices=2",
                                          "trainer.strategy=ddp"])
        fixed = compose("train", overrides=["logger=none", "trainer.accelerator=cpu", "trainer.max_steps=123"])
        accumulating = compose("train", overrides=["logger=none", "trainer.accelerator=cpu",
                                                   "+trainer.accumulate_grad_batches=4"])
    trainer, _ = build_trainer(two, tmp_path / "a")
    assert trainer.world_size == 2 and trainer.max_steps == 8_000_000 // (8 * 2)
    assert build_trainer(accumulating, tmp_path / "c")[0].max_steps == 8_000_000 // (8 * 4)  # optimiser steps
    assert build_trainer(fixed, tmp_path / "b")[0].max_steps == 123


def test_scannet_keeps_every_tenth_frame_pair_whatever_its_score(tmp_path):
    """As the recipe: pairs of frames that are multiples of 10, no filter on the overlap score unless
    min_score asks for one."""
    from dkm.data.scannet import ScanNetScene

    root = make_scannet_scene(tmp_path)
    index = dict(np.load(root / "scannet_indices" / "scene0000_00.npz"))
    index["score"] = np.zeros_like(index["score"])
    assert len(ScanNetScene(root, index, "s")) == 2 and len(ScanNetScene(root, index, "s", min_score=0.0)) == 0
    index["name"] = np.concatenate([index["name"], [[0, 0, 5, 10]]])  # frame 5: not a multiple of 10
    index["score"] = np.concatenate([index["score"], [0.9]])
    assert len(ScanNetScene(root, index, "s")) == 2


def test_a_requeued_slurm_job_resumes_from_its_signal_checkpoint(tmp_path, monkeypatch, caplog):
    """In a SLURM job the run directory is named by the job id (the same for every task and across a
    requeue), train() resumes from the newest hpc_ckpt_<n>.ckpt Lightning wrote there on the requeue
    signal (numerically newest: 10 after 2), even if the command line names an older ckpt_path, then
    deletes the older ones, and W&B continues the job's run."""
    import shutil
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dkm.lightning.loggers import build_logger
    from dkm.lightning.train import resume_path, train

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tiny = ["experiment=quickstart", "final_eval=null", "logger=none", "model.h=64", "model.w=96",
            "trainer.max_time=null", "trainer.enable_progress_bar=false", "data.module.batch_size=2",
            "data.module.samples_per_epoch=8", "log_images_every_n_steps=0", "checkpoint.monitor=null",
            "checkpoint.every_n_train_steps=1"]
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        run_dir = compose("train", overrides=tiny, return_hydra_config=True).hydra.run.dir
        first = compose("train", overrides=[*tiny, "trainer.max_steps=2"])
        again = compose("train", overrides=[*tiny, "trainer.max_steps=3", "ckpt_path=/nowhere/old.ckpt"])
    assert run_dir == "outputs/train/quickstart/4242"
    out = tmp_path / "4242"
    assert resume_path(out, "a.ckpt") == "a.ckpt"
    train(first, out)
    (out / "hpc_ckpt_2.ckpt").write_bytes(b"an older requeue")  # would fail to load if it were used
    shutil.copy(out / "checkpoints" / "last.ckpt", out / "hpc_ckpt_10.ckpt")  # as the signal handler writes it
    with caplog.at_level("INFO", logger="dkm.lightning.train"):
        result = train(again, out)  # would fail on /nowhere/old.ckpt if it were used
    assert result["trainer"].global_step == 3 and len(result["module"].loss_history) == 1
    assert [p.name for p in out.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_10.ckpt"]  # the older one removed
    assert any("requeue checkpoint" in r.getMessage() and "/nowhere/old.ckpt" in r.getMessage()
               for r in caplog.records)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = build_logger({"kind": "wandb", "project": "dkm", "name": "dkm base/v11"}, tmp_path)
    assert logger._id == "dkm_base_v11-4242"


def test_checkpoints_follow_the_run_end_and_the_monitored_evaluation(tmp_path):
    """``last.ckpt`` holds the final step also when the run ends between periodic saves; best-k
    checkpoints are saved right after each evaluation of the monitored benchmark (never ranked by an
    older one's score); a monitor that names no metric source fails before training, a metric the
    benchmark does not report at its first evaluation; a benchmark run every epoch logs (and feeds
    the best-k checkpoint) without Lightning's on_step error; bf16 mixed precision trains."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dkm.lightning.train import train
    from synthetic_benchmarks import make_hpatches

    hp = make_hpatches(tmp_path / "hp", seqs=("v_a",), seed=3)
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    tiny = ["experiment=quickstart", "final_eval=null", "logger=none", "model.h=64", "model.w=96",
            "trainer.max_time=null", "trainer.enable_progress_bar=false", "data.module.batch_size=2",
            "data.module.samples_per_epoch=8", "log_images_every_n_steps=0"]
    bench = ["callbacks=[hpatches]", f"callbacks.hpatches.data_root={hp}", "callbacks.hpatches.limit=2",
             "callbacks.hpatches.num_log_pairs=0", "callbacks.hpatches.benchmark.num_samples=500"]

    def run(name, *overrides):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("train", overrides=[*tiny, *overrides])
        return train(cfg, tmp_path / name)

    def step_of(path):
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]

    res = run("a", "trainer.max_steps=5", "checkpoint.every_n_train_steps=2", "checkpoint.monitor=null")
    assert step_of(res["last_ckpt"]) == 5 and res["best_ckpt"] is None
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["last.ckpt"]
    import json  # the run directory records the exact config and the software it ran with
    assert [v["torch"] for v in json.loads((tmp_path / "a" / "versions.json").read_text())] == [torch.__version__]
    assert "max_steps: 5" in (tmp_path / "a" / "config.yaml").read_text()

    res = run("b", *bench, "callbacks.hpatches.every_n_steps=2", "trainer.max_steps=4",
              "checkpoint.every_n_train_steps=3", "checkpoint.monitor=hpatches/auc@5", "checkpoint.save_top_k=3")
    best = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("best-*.ckpt"))
    assert best == ["best-2.ckpt", "best-4.ckpt"] and Path(res["best_ckpt"]).name in best  # at the evaluations
    assert step_of(res["last_ckpt"]) == 4  # also rewritten at the end when a best-k save took the final step

    # resumed in the same directory (a SLURM requeue) with checkpoint settings whose callback state does
    # not match the checkpoint's: last.ckpt is still the one rewritten (no last-v1.ckpt next to a stale one)
    run("g", "trainer.max_steps=2", "checkpoint.every_n_train_steps=1", "checkpoint.monitor=train/loss_ema")
    res = run("g", "trainer.max_steps=4", "checkpoint.every_n_train_steps=3", "checkpoint.monitor=null",
              f"ckpt_path={tmp_path / 'g' / 'checkpoints' / 'last.ckpt'}")
    assert step_of(res["last_ckpt"]) == 4 and not list((tmp_path / "g" / "checkpoints").glob("last-v*.ckpt"))

    # a step where both save: last.ckpt holds the best-k state with that step's best checkpoint in it, so
    # that a run resumed from last.ckpt keeps track of (and, past save_top_k, deletes) it
    res = run("i", "trainer.max_steps=2", "checkpoint.every_n_train_steps=2", "checkpoint.monitor=train/loss_ema")
    states = torch.load(res["last_ckpt"], map_location="cpu", weights_only=False)["callbacks"]
    best_state = next(v for k, v in states.items() if k.startswith("BestCheckpoint"))
    assert Path(best_state["best_model_path"]).name == "best-2.ckpt" == Path(res["best_ckpt"]).name

    with pytest.raises(ValueError, match=r"no such metric source.*\['hpatches'\]"):
        run("c", *bench, "trainer.max_steps=2", "checkpoint.monitor=hpatch/auc@5")
    with pytest.raises(ValueError, match=r"monitor=train/los_ema: the training step logs no such .*'train/loss_ema'"):
        run("h", "trainer.max_steps=3", "checkpoint.every_n_train_steps=2", "checkpoint.monitor=train/los_ema")
    assert not (tmp_path / "h" / "checkpoints").exists()  # failed after the first step, before any save
    with pytest.raises(ValueError, match=r"hpatches reports .*hpatches/auc@5"):
        run("d", *bench, "callbacks.hpatches.every_n_steps=1", "trainer.max_steps=2", "checkpoint.monitor=hpatches/auc5")

    res = run("e", *bench, "callbacks.hpatches.every_n_steps=null", "callbacks.hpatches.every_n_epochs=1",
              "trainer.max_steps=4", "checkpoint.monitor=hpatches/auc@5")  # 4 steps = one epoch
    assert sorted(p.name for p in (tmp_path / "e" / "checkpoints").glob("best-*.ckpt")) == ["best-4.ckpt"]
    assert (tmp_path / "e" / "benchmarks" / "hpatches" / "step00000004" / "metrics.json").exists()
    # stopped inside the second epoch (max_steps; likewise max_time or a requeue signal): no evaluation
    # there, which would be off the every-epoch schedule (Lightning calls on_train_epoch_end all the same)
    run("e2", *bench, "callbacks.hpatches.every_n_steps=null", "callbacks.hpatches.every_n_epochs=1",
        "trainer.max_steps=6", "checkpoint.monitor=null")
    assert sorted(p.name for p in (tmp_path / "e2" / "benchmarks" / "hpatches").iterdir()) == ["step00000004"]
    # epochs cut short by limit_train_batches do end (Lightning's own test: as many batches as the epoch has)
    run("e3", *bench, "callbacks.hpatches.every_n_steps=null", "callbacks.hpatches.every_n_epochs=1",
        "trainer.max_steps=4", "+trainer.limit_train_batches=2", "checkpoint.monitor=null")
    assert sorted(p.name for p in (tmp_path / "e3" / "benchmarks" / "hpatches").iterdir()) == ["step00000002",
                                                                                             "step00000004"]

    res = run("f", "trainer.max_steps=2", "trainer.precision=bf16-mixed", "checkpoint.monitor=null")
    assert res["trainer"].global_step == 2 and all(math.isfinite(v) for v in res["module"].loss_history)


def test_resuming_elsewhere_keeps_the_versions_and_csv_logs_and_bad_resume_settings_fail_at_start(tmp_path):
    """A run resumed from a checkpoint into a new directory starts its versions.json from the history
    the checkpoint carries; the CSV logger keeps each start's metrics (version_0, version_1, ...)
    instead of deleting the earlier ones; its hparams.yaml reads back with a safe YAML loader;
    ``ckpt_path`` naming weights only (a .pth) and an unknown ``requeue_signal`` fail before training."""
    import json
    from pathlib import Path

    import yaml
    from hydra import compose, initialize_config_dir

    from dkm.lightning.train import train

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    tiny = ["experiment=quickstart", "final_eval=null", "logger=csv", "model.h=64", "model.w=96",
            "trainer.max_time=null", "trainer.enable_progress_bar=false", "data.module.batch_size=2",
            "data.module.samples_per_epoch=8", "log_images_every_n_steps=0", "trainer.log_every_n_steps=1",
            "checkpoint.monitor=null"]

    def run(name, *overrides):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("train", overrides=[*tiny, *overrides])
        return train(cfg, tmp_path / name)

    first = run("a", "trainer.max_steps=2", "checkpoint.every_n_train_steps=2")
    older = {"dkm": "0.0.1", "torch": "1.0"}  # as if the first start had run other software
    (tmp_path / "a" / "versions.json").write_text(json.dumps([older]))
    ckpt = torch.load(first["last_ckpt"], map_location="cpu", weights_only=False)
    assert len(ckpt["dkm_software_versions"]) == 1
    ckpt["dkm_software_versions"] = [older]
    torch.save(ckpt, tmp_path / "a" / "older.ckpt")
    run("b", "trainer.max_steps=4", "checkpoint.every_n_train_steps=2", f"ckpt_path={tmp_path / 'a' / 'older.ckpt'}")
    history = json.loads((tmp_path / "b" / "versions.json").read_text())
    assert history[0] == older and history[1]["torch"] == torch.__version__ and len(history) == 2
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["dkm_software_versions"] == history
    # the same directory again (a requeue): both starts' metrics stay
    run("b", "trainer.max_steps=6", "checkpoint.every_n_train_steps=2",
        f"ckpt_path={tmp_path / 'b' / 'checkpoints' / 'last.ckpt'}")
    steps = {v.name: sorted({int(r["step"]) for r in csv.DictReader(open(v / "metrics.csv")) if r.get("train/loss_step")})
             for v in sorted((tmp_path / "b" / "csv").iterdir())}
    assert steps == {"version_0": [2, 3], "version_1": [4, 5]}, steps
    hparams = yaml.safe_load((tmp_path / "b" / "csv" / "version_1" / "hparams.yaml").read_text())
    assert hparams["versions"]["torch"] == torch.__version__

    torch.save(first["module"].model.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ValueError, match=r"weights.pth is not a checkpoint of train.py .*model.weights=.*weights.pth"):
        run("c", "trainer.max_steps=2", f"ckpt_path={tmp_path / 'weights.pth'}")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.ckpt"):
        run("c", "trainer.max_steps=2", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(ValueError, match=r"requeue_signal='SIGFOO': expected null or a signal name"):
        run("c", "trainer.max_steps=2", "requeue_signal=SIGFOO")
    assert not (tmp_path / "c" / "checkpoints").exists()
    with pytest.raises(Exception, match="Could not load 'callbacks/hpatchs'"):  # a misspelt callback: not ignored
        run("c", "trainer.max_steps=2", "callbacks=[hpatchs]")


def test_benchmark_callback_runs_once_per_optimiser_step():
    """With gradient accumulation a step spans several batches: the benchmark runs once per step."""
    from types import SimpleNamespace

    from dkm.lightning.callbacks import BenchmarkCallback

    cb = BenchmarkCallback("b", benchmark=[0, 1, 2], every_n_steps=2)  # (anything with a length)
    runs = []
    cb.run = lambda trainer, module, **kw: runs.append(trainer.global_step)
    for step in (1, 1, 2, 2, 3, 3, 4, 4):  # two batches per optimiser step
        cb.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, 0)
    assert runs == [2, 4]


def test_benchmark_callback_logs_the_a_to_b_half_of_a_symmetric_warp(tmp_path, monkeypatch, caplog):
    """The logged panel of a DKMv3 match (columns :W A -> B, W: B -> A) shows A -> B at the
    image's width; a failure to draw is a warning, never a crash."""
    from types import SimpleNamespace

    import dkm.lightning.callbacks as callbacks
    from dkm.benchmarks import HpatchesHomogBenchmark
    from synthetic_benchmarks import make_hpatches

    bench = HpatchesHomogBenchmark(make_hpatches(tmp_path / "hp", seqs=("v_a",), seed=3))
    h, w = 48, 64

    class Symmetric:
        symmetric = True

        def match(self, im1, im2):
            grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, 2 * w), indexing="ij"), -1)
            return torch.cat((grid, grid), -1), torch.ones(h, 2 * w)

    logged = []
    monkeypatch.setattr(callbacks, "log_warp_image", lambda logger, key, img, step, caption: logged.append(img))
    cb = callbacks.BenchmarkCallback("hpatches", bench, every_n_steps=1, num_log_pairs=1)
    with caplog.at_level("WARNING", logger="dkm.lightning.callbacks"):
        cb._log_pairs(SimpleNamespace(logger=object(), global_step=1), Symmetric())
    assert not caplog.records and len(logged) == 1 and logged[0].shape == (h, 4 * w, 3)  # four tiles of width w


def test_step_metrics_are_averaged_over_ranks_in_one_collective():
    """The per-scale loss terms and the EMA reach the logger as the mean over the ranks, reduced in one
    all-reduce per step (not one per value)."""
    from types import SimpleNamespace

    from dkm.lightning.module import DKMLightningModule

    module = DKMLightningModule({"arch": "dkm_small", "h": 64, "w": 96, **TINY_ARCH}, {}, {})
    calls = []

    def reduce(t, reduce_op):  # rank 1 holds twice rank 0's values
        calls.append((tuple(t.shape), reduce_op))
        return (t + 2 * t) / 2

    module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    out = module._mean_over_ranks({"train/a": 1.0, "train/b": torch.tensor(4.0, dtype=torch.float64)})
    assert calls == [((2,), "mean")]
    assert {k: v.item() for k, v in out.items()} == {"train/a": 1.5, "train/b": 6.0}
    module._trainer = SimpleNamespace(world_size=1, strategy=None)
    assert module._mean_over_ranks({"train/a": 2.0})["train/a"].item() == 2.0


class _HostCopies(pl.Callback):
    """Counts, per training step, the calls that copy a tensor to the host (on a GPU each one waits for
    the queued kernels: in ``training_step`` it would stall the device before every backward pass), and
    records each step's loss as the training loop returns it."""

    METHODS = ("__float__", "item", "tolist", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.monkeypatch, self.copies, self.losses = monkeypatch, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.copies.append(0)
        step = pl_module.training_step

        def counted(*args, **kwargs):
            with self.monkeypatch.context() as m:
                for name in self.METHODS:
                    def count(t, *a, _orig=getattr(torch.Tensor, name), **k):
                        self.copies[-1] += 1
                        return _orig(t, *a, **k)
                    m.setattr(torch.Tensor, name, count)
                return step(*args, **kwargs)

        self.monkeypatch.setattr(pl_module, "training_step", counted)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.monkeypatch.delattr(pl_module, "training_step")
        self.losses.append(float(outputs["loss"]))


def test_training_step_copies_nothing_to_the_host_and_keeps_every_loss(tmp_path, monkeypatch):
    optim = {"lr_encoder": 1e-4, "lr_decoder": 1e-4, "milestones": [0.5, 0.9]}
    module = DKMLightningModule(TINY, {"ce_weight": 0.01}, optim, log_images_every_n_steps=0)
    module.PENDING_LOSSES = 2  # the losses go to the host in one copy every 2 steps
    copies = _HostCopies(monkeypatch)
    trainer, _ = _trainer(tmp_path, 5, [copies], every_n_train_steps=100)
    data = DKMDataModule([{"kind": "synthetic_homography", "images": ["astronaut"], "length": 10}], h=64, w=96,
                         batch_size=2, samples_per_epoch=10, num_workers=0)
    trainer.fit(module, datamodule=data)
    assert copies.copies == [0, 1, 0, 1, 0]
    assert module.loss_history == pytest.approx(copies.losses, rel=1e-6) and len(module.loss_history) == 5
    # the smoothed loss, kept on the device: an exponential moving average with decay 0.99
    ema = copies.losses[0]
    for value in copies.losses[1:]:
        ema = 0.99 * ema + 0.01 * value
    assert float(trainer.callback_metrics["train/loss_ema"]) == pytest.approx(ema, rel=1e-6)
    # and into the checkpoint as a number
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["dkm_loss_ema"] == pytest.approx(ema, rel=1e-6)


def test_export_refuses_files_that_are_not_lightning_checkpoints(tmp_path, capsys):
    """A text file, a truncated checkpoint, a saved list and a missing file: a usage error naming the
    file (exit 2), not a torch traceback; nothing is written."""
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    listed = tmp_path / "list.ckpt"
    torch.save([1, 2], listed)
    for path, expected in ((text, "could not be read as a torch checkpoint"),
                           (truncated, "could not be read as a torch checkpoint"),
                           (listed, "not a Lightning checkpoint (expected a dict with a 'state_dict', got list)"),
                           (tmp_path / "gone.ckpt", "checkpoint not found")):
        with pytest.raises(SystemExit) as e:
            export_main([str(path), str(tmp_path / "out.pth")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(path) in err and expected in err, err
    assert not (tmp_path / "out.pth").exists()


def test_an_epoch_without_one_full_batch_is_refused():
    """samples_per_epoch is split over sources and devices; with drop_last a share below batch_size
    would give Lightning no training batch ("No training batches", then a run that reports a
    checkpoint it never wrote): refused with the numbers to change."""
    from types import SimpleNamespace

    data = DKMDataModule([{"kind": "synthetic_homography", "images": ["astronaut"], "length": 10}], h=64, w=96,
                         batch_size=4, samples_per_epoch=6, num_workers=0)
    data.setup("fit")
    data.trainer = SimpleNamespace(global_rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"samples_per_epoch=6 over 1 data source\(s\) and 2 device\(s\) gives 3 "
                                         r"pairs .*batch_size=4: set samples_per_epoch to at least 8"):
        data.train_dataloader()
    data.trainer = SimpleNamespace(global_rank=0, world_size=1)
    assert len(list(data.train_dataloader())) == 1  # 6 pairs on one device: one batch of 4


def test_the_dkmv3_recipe_validates_with_the_dense_benchmark_at_the_end_of_each_epoch(tmp_path):
    """experiment=dkmv3_outdoor on a generated MegaDepth tree (a training scene and the held-out 0015 and
    0022): after the epoch (4 pairs, 2 steps) the dense MegaDepth benchmark scores 0015/0022's pairs of
    the training tree, writes its outputs, and leaves the model as it found it (symmetric, upsampling
    and train mode back)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from dkm.lightning.train import train

    for scene, n, seed in (("0001", 3, 1), ("0015", 2, 3), ("0022", 1, 4)):
        make_megadepth_scene(tmp_path / "mega", scene=scene, n_pairs=n, hw=(96, 128), seed=seed)
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=dkmv3_outdoor", f"data.module.sources.0.data_root={tmp_path / 'mega'}", "logger=none",
            "model.h=64", "model.w=96", "model.backbone_weights=null", "trainer.accelerator=cpu",
            "trainer.max_steps=2", "data.module.batch_size=2", "data.module.samples_per_epoch=4",
            "data.module.num_workers=0", "data.module.persistent_workers=false", "data.module.pin_memory=false",
            "log_images_every_n_steps=0", "trainer.enable_progress_bar=false"])
    res = train(cfg, tmp_path / "run")
    (callback,) = [c for c in res["trainer"].callbacks if hasattr(c, "benchmark")]
    assert callback.name == "megadepth_dense" and callback.benchmark.upsample_preds is False
    assert [r["pair_id"] for r in callback.last_records] == ["0015/0_0-0_1", "0015/1_0-1_1", "0022/0_0-0_1"]
    assert callback.last_metrics["num_failed"] == 0 and callback.last_metrics["num_pairs"] == 3
    out = tmp_path / "run" / "benchmarks" / "megadepth_dense" / "step00000002"
    assert (out / "metrics.json").is_file() and (out / "pairs.csv").is_file()
    model = res["module"].model
    assert (model.symmetric, model.upsample_preds, model.training) == (True, True, True)


def test_the_quickstart_command_trains_and_reports_its_last_line(tmp_path):
    """The README's main job (``python train.py experiment=quickstart``) end to end on a 10-step schedule:
    training, checkpoints, the offline W&B run, the held-out evaluation and the report as the last line.
    The baselines (no warp, SIFT) do not depend on training: their numbers are the README's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(repo / "train.py"), "experiment=quickstart", "trainer.max_steps=10",
                          "checkpoint.every_n_train_steps=5", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"held-out \(15 pairs, HPatches protocol\) \| trained: AUC@3/5/10 [\d.]+/[\d.]+/[\d.]+, "
                        r"median error [\d.]+px \| untrained: .* \| no-warp: AUC@3/5/10 0\.0/0\.0/0\.0, median error "
                        r"72\.8px \| SIFT: AUC@3/5/10 93\.5/96\.1/98\.0, median error 0\.2px", lines[-1])
    assert any(line.startswith("checkpoint: ") and line.endswith("last.ckpt") for line in lines)
    out = tmp_path / "run"
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "config.yaml").is_file()
    assert any((out / "wandb").glob("offline-run-*")) and (out / "train.log").is_file()
    metrics = json.loads((out / "quickstart_metrics.json").read_text())
    assert set(metrics) >= {"trained", "untrained", "no-warp", "SIFT"} and metrics["SIFT"]["num_pairs"] == 15
