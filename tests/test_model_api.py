"""match()/sample()/weights-loading behaviour of the public API, on a small random model."""
from __future__ import annotations

import copy
import pathlib
import platform
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from dkm import build_model, dkm_base, dkm_small, load_weights
from dkm.geometry.coords import normalized_grid, normalized_to_pixel, pixel_to_normalized
from dkm.models import zoo


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return dkm_small(h=64, w=96).eval()


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((160, 120), Image.BILINEAR)


def test_match_accepts_pil_paths_and_tensors_consistently(small, rgb, tmp_path):
    p1, p2 = tmp_path / "a.png", tmp_path / "b.jpg"
    rgb.save(p1)
    rgb.rotate(5).save(p2, quality=98)
    w_pil, c_pil = small.match(rgb, Image.open(p2))
    w_path, c_path = small.match(str(p1), p2)
    assert w_pil.shape == (64, 96, 4) and c_pil.shape == (64, 96)
    torch.testing.assert_close(w_pil, w_path)
    torch.testing.assert_close(c_pil, c_path)
    t1 = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()[None] / 255
    t2 = torch.from_numpy(np.array(Image.open(p2).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
    w_t, c_t = small.match(torch.cat([t1, t2]), torch.cat([t2, t1]))
    assert w_t.shape == (2, 64, 96, 4) and c_t.shape == (2, 64, 96)
    assert ((c_t >= 0) & (c_t <= 1)).all()
    # query half of the warp is the pixel-centre grid of the internal resolution
    torch.testing.assert_close(w_t[0, ..., :2], normalized_grid(64, 96))
    assert w_t[..., 2:].abs().max() <= 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "1", "CMYK"])
def test_match_converts_image_modes(small, rgb, mode):
    if mode == "I;16":
        arr = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        im = Image.fromarray(arr)
        assert im.mode.startswith("I;16")
        ref8 = rgb.convert("L").convert("RGB")
    else:
        im = rgb.convert(mode)
        ref8 = im.convert("RGB")
    w, c = small.match(im, im)
    w_ref, c_ref = small.match(ref8, ref8)
    assert w.shape == (64, 96, 4)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=0)


def test_match_takes_the_releases_positional_options(small, rgb):
    """``match(im1, im2, batched, check_cycle_consistency, do_pred_in_og_res)`` as in the v11 release."""
    positional = small.match(rgb, rgb, False, True)
    keyword = small.match(rgb, rgb, check_cycle_consistency=True)
    for a, b in zip(positional, keyword):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(positional[1], small.match(rgb, rgb)[1])  # the option took effect
    with pytest.raises(TypeError, match="at most 5 positional arguments .* got 6"):
        small.match(rgb, rgb, False, False, False, True)


def test_float_and_32_bit_images_are_read_by_their_range_or_refused():
    """Mode F in [0, 1] and mode I up to 65535 become the 8-bit image they encode; values outside
    those ranges (a float image in 0..255, an int32 image of counts) are refused, not clipped to white."""
    from dkm.utils.image import load_image

    gray = np.arange(64 * 96, dtype=np.float64).reshape(64, 96) % 256
    expected = np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray((gray / 255).astype(np.float32), "F"))),
                                  expected)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray((gray * 257).astype(np.int32), "I"))),
                                  expected)
    with pytest.raises(ValueError, match=r"float image \(mode F\) with values in \[0, 255\]; expected \[0, 1\]"):
        load_image(Image.fromarray(gray.astype(np.float32), "F"))
    with pytest.raises(ValueError, match=r"32-bit integer image \(mode I\) with values in \[1e\+06, 1e\+06\]; expected \[0, 65535\]"):
        load_image(Image.fromarray(np.full((8, 8), 10**6, dtype=np.int32), "I"))
    with pytest.raises(ValueError, match=r"PIL image: cannot convert image mode La to RGB"):
        load_image(Image.new("La", (8, 8)))
    with pytest.raises(IsADirectoryError, match="is a directory, not an image file"):
        load_image(pathlib.Path(__file__).parent)


def test_internal_resolution_and_original_resolution(small, rgb):
    model = dkm_small(h=32, w=64)
    w, c = model.match(rgb, rgb)
    assert w.shape == (32, 64, 4)
    w, c = small.match(rgb, rgb.resize((100, 90)), do_pred_in_og_res=True)
    assert w.shape == (120, 160, 4) and c.shape == (120, 160)
    torch.testing.assert_close(w[..., :2], normalized_grid(120, 160))


@pytest.mark.parametrize("fast", [False, True])
def test_prediction_in_original_resolution_refines_there_three_times(small, rgb, monkeypatch, fast):
    """do_pred_in_og_res (v11): the internal prediction bilinearly upsampled to im1's size, then three passes of
    the stride-1 refiner on the full-resolution images, each adding sigmoid(dc) * disp / (4W, 4H) to the flow
    and dc to the certainty logit (the release's upsample_preds). A stub refiner with a constant output pins it."""
    support_im = rgb.transpose(Image.FLIP_LEFT_RIGHT).resize((100, 90))
    internal, internal_cert = small.match(rgb, support_im, fast=fast)  # (64, 96): the real refiners
    calls = []
    refiner = small.decoder.conv_refiner["1"]
    real_forward = refiner.forward

    def forward(query, support, flow, **kwargs):  # the stub at full resolution, the real refiner elsewhere
        if query.shape[-2:] != (120, 160):
            return real_forward(query, support, flow, **kwargs)
        calls.append((tuple(query.shape), tuple(support.shape), tuple(flow.shape)))
        b, _, h, w = flow.shape
        dc = torch.full((b, 1, h, w), 0.4, dtype=flow.dtype)
        disp = torch.stack([torch.full((b, h, w), 8.0), torch.full((b, h, w), -4.0)], 1).to(flow.dtype)
        return dc, disp

    monkeypatch.setattr(refiner, "forward", forward)
    w, c = small.match(rgb, support_im, do_pred_in_og_res=True, fast=fast)
    assert calls == [((1, 3, 120, 160), (1, 3, 90, 100), (1, 2, 120, 160))] * 3
    up = F.interpolate(internal[..., 2:].permute(2, 0, 1)[None], size=(120, 160), mode="bilinear",
                       align_corners=False)[0].permute(1, 2, 0)
    gate = torch.sigmoid(torch.tensor(0.4))
    expected = (up + 3 * gate * torch.tensor([8.0 / (4 * 160), -4.0 / (4 * 120)])).clamp(-1, 1)
    torch.testing.assert_close(w[..., 2:], expected, atol=2e-5, rtol=0)
    logit = torch.logit(internal_cert.double(), eps=0).float()[None, None]
    up_logit = F.interpolate(logit, size=(120, 160), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(c, torch.sigmoid(up_logit + 3 * 0.4), atol=1e-4, rtol=0)
    torch.testing.assert_close(w[..., :2], normalized_grid(120, 160))


def test_cycle_consistency_works_on_batches(small, rgb):
    other = rgb.transpose(Image.FLIP_LEFT_RIGHT)
    w1, c1 = small.match(rgb, other, check_cycle_consistency=True)
    w2, c2 = small.match(other, rgb, check_cycle_consistency=True)
    to_t = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255  # noqa: E731
    wb, cb = small.match(torch.stack([to_t(rgb), to_t(other)]), torch.stack([to_t(other), to_t(rgb)]),
                         check_cycle_consistency=True)
    assert wb.shape == (2, 64, 96, 4)
    # PIL and tensor resizing differ slightly; compare the bulk of pixels
    for wi, ci, b in ((w1, c1, 0), (w2, c2, 1)):
        close = (wb[b] - wi).abs().amax(-1) < 2e-2
        assert close.float().mean() > 0.9
    # pairs in a batch do not influence each other
    ws, cs = small.match(torch.stack([to_t(rgb)]), torch.stack([to_t(other)]), check_cycle_consistency=True)
    torch.testing.assert_close(ws[0], wb[0], atol=1e-4, rtol=0)


def test_match_restores_training_mode(small, rgb):
    small.train()
    small.match(rgb, rgb)
    assert small.training
    small.eval()
    small.match(rgb, rgb)
    assert not small.training


def test_match_rejects_bad_input(small, rgb, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        small.match(tmp_path / "missing.png", rgb)
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not_an_image.jpg"):
        small.match(bad, rgb)
    with pytest.raises(ValueError, match="1x1"):
        small.match(Image.new("RGB", (1, 1)), rgb)
    with pytest.raises(ValueError, match="NaN"):
        small.match(torch.full((1, 3, 32, 32), float("nan")), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        small.match(torch.zeros(1, 5, 32, 32), torch.zeros(1, 5, 32, 32))
    with pytest.raises(ValueError, match="batch sizes"):
        small.match(torch.zeros(2, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"im1 has shape \(0, 3, 32, 32\); need B >= 1"):
        small.match(torch.zeros(0, 3, 32, 32), torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match="float64"):
        small.match(rgb, rgb, dtype=torch.float64)


def test_match_takes_any_float_dtype_and_refuses_normalized_tensors(small, rgb):
    """Image tensors of any float dtype match as their float32 values; a slight overshoot of [0, 1]
    (a bicubic resize's) is clamped; ImageNet-normalized tensors (the v11 release's batched mode)
    are refused, as is a device the model is not on."""
    x = torch.from_numpy(np.asarray(rgb.resize((96, 64)), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    y = x.flip(-1)
    w32, c32 = small.match(x, y)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        w, c = small.match(x.to(dt), y.to(dt))
        xr, yr = x.to(dt).float(), y.to(dt).float()
        w_ref, c_ref = small.match(xr, yr)  # the float32 values of the rounded images
        assert w.dtype == torch.float32 and torch.equal(w, w_ref) and torch.equal(c, c_ref), dt
    w64, _ = small.match(x.double(), y.double())
    assert torch.equal(w64, w32)
    over = x * 1.2 - 0.1  # in [-0.1, 1.1]
    w_over, c_over = small.match(over, y)
    w_clamp, c_clamp = small.match(over.clamp(0, 1), y)
    assert torch.equal(w_over, w_clamp) and torch.equal(c_over, c_clamp)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with pytest.raises(ValueError, match="im1 has values in .*ImageNet-normalized"):
        small.match((x - mean) / std, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast: match() stays float32
        w_ac, c_ac = small.match(x, y)
    assert torch.equal(w_ac, w32) and torch.equal(c_ac, c32)
    double = copy.deepcopy(small).double()  # a float64 model takes float64 (and float32) images
    w_d, _ = double.match(x.double(), y.double())
    assert w_d.dtype == torch.float64 and (w_d - w32.double()).abs().max() < 1e-3
    w_dev, _ = small.match(x, y, device="cpu")
    assert torch.equal(w_dev, w32)
    with pytest.raises(ValueError, match="model is on cpu"):
        small.match(x, y, device="cuda:0")


def test_sample_is_weighted_reproducible_and_thresholded():
    h, w = 40, 50
    grid = normalized_grid(h, w)
    matches = torch.cat([grid, grid], dim=-1)
    cert = torch.zeros(h, w)
    cert[:20] = 1.0  # only the top half is certain
    cert[20:25] = 0.01
    g = torch.Generator().manual_seed(3)
    m1, c1 = zoo.RegressionMatcher.sample(matches, cert, 500, generator=g)
    m2, c2 = zoo.RegressionMatcher.sample(matches, cert, 500, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(m1, m2)
    assert m1.shape == (500, 4) and c1.shape == (500,)
    assert len({tuple(r) for r in m1.tolist()}) == 500  # without replacement
    # weight 1 vs 0.01: nearly all samples are from the certain rows (y < 0)
    assert (m1[:, 1] < 0).float().mean() > 0.95
    # relative threshold removes the 0.01 rows entirely
    m3, c3 = zoo.RegressionMatcher.sample(matches, cert, 2000, relative_confidence_threshold=0.5, generator=g)
    assert (c3 == 1).all() and m3.shape == (1000, 4)
    # fewer candidates than requested: returns all of them, no error
    m4, c4 = zoo.RegressionMatcher.sample(matches, cert, 10**6)
    assert m4.shape == (1250, 4)
    # numpy in, numpy out
    m5, c5 = zoo.RegressionMatcher.sample(matches.numpy(), cert.numpy(), 10)
    assert isinstance(m5, np.ndarray) and m5.shape == (10, 4)
    # a negative count, or matches that are not rows of 4 (e.g. channels first), are refused
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match=rf"sample\(num={bad}\): expected a whole number >= 0"):
            zoo.RegressionMatcher.sample(matches, cert, bad)
    with pytest.raises(ValueError, match=r"matches of shape \(4, 40, 50\); expected \(\.\.\., 4\)"):
        zoo.RegressionMatcher.sample(matches.permute(2, 0, 1), cert, 10)
    with pytest.raises(TypeError, match=r"sample\(generator=0\): expected a torch.Generator"):
        zoo.RegressionMatcher.sample(matches, cert, 10, generator=0)
    # a batch of pairs is refused (pooling would mix their matches); a batch of one is one pair
    with pytest.raises(ValueError, match=r"shape \(2, 40, 50, 4\) hold 2 pairs; sample each pair"):
        zoo.RegressionMatcher.sample(torch.stack([matches, matches]), torch.stack([cert, cert]), 10)
    assert zoo.RegressionMatcher.sample(matches[None], cert[None], 10)[0].shape == (10, 4)


def test_sample_defaults_to_each_releases_number_of_matches(small):
    """``sample(matches, certainty)`` without ``num``: 20000 as the v11 release (also on the class),
    10000 as DKMv3's."""
    grid = normalized_grid(200, 150)
    matches, cert = torch.cat([grid, grid], dim=-1), torch.rand(200, 150) + 0.1
    assert zoo.RegressionMatcher.sample(matches, cert)[0].shape == (20000, 4)
    assert small.version == "v11" and small.sample(matches, cert)[0].shape == (20000, 4)
    v3 = build_model({"arch": "dkmv3_indoor", "h": 32, "w": 48})
    assert v3.sample(matches, cert, mode="proportional")[0].shape == (10000, 4)


def test_to_pixel_coordinates_and_convention():
    m = torch.tensor([[-1 + 1 / 8, -1 + 1 / 4, 1.0, -1.0]])  # centre of pixel (0, 0) in a 4x2 image
    ka, kb = zoo.RegressionMatcher.to_pixel_coordinates(m, 4, 8, 10, 20)
    torch.testing.assert_close(ka, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(kb, torch.tensor([[20.0, 0.0]]))
    with pytest.raises(ValueError, match=r"matches of shape \(1, 3\); expected \(\.\.\., 4\)"):
        zoo.RegressionMatcher.to_pixel_coordinates(m[:, :3], 4, 8, 10, 20)
    ka0, _ = zoo.RegressionMatcher.to_pixel_coordinates(m, 4, 8, 10, 20, center=0.0)
    torch.testing.assert_close(ka0, torch.tensor([[0.0, 0.0]]))
    uv = np.array([[3.0, 7.0]])
    np.testing.assert_allclose(normalized_to_pixel(pixel_to_normalized(uv, 9, 11, 0.0), 9, 11, 0.0), uv)


def test_weights_loading_checks_keys_and_accepts_lightning_ckpt(small, tmp_path):
    sd = small.state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    fresh = dkm_small(h=64, w=96, weights=path)
    torch.testing.assert_close(fresh.state_dict()["decoder.proj.32.weight"], sd["decoder.proj.32.weight"])
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 3}, ckpt)
    load_weights(dkm_small(h=64, w=96), ckpt)
    broken = dict(sd)
    broken.pop("decoder.proj.32.weight")
    broken["decoder.extra"] = torch.zeros(1)
    broken["decoder.proj.16.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError) as e:
        load_weights(dkm_small(h=64, w=96), broken)
    msg = str(e.value)
    assert "missing" in msg and "decoder.proj.32.weight" in msg
    assert "unexpected" in msg and "decoder.extra" in msg
    assert "decoder.proj.16.weight" in msg and "(1, 1, 1, 1)" in msg
    assert "These are the weights of" not in msg  # (no architecture has these keys)
    # the weights of another architecture: named, with the option that builds it
    with pytest.raises(ValueError, match=r"w.pth does not fit .*These are the weights of dkm_small in its default "
                                         r"configuration: build that \(model=dkm_small on the command line"):
        build_model({"arch": "dkm_base", "weights": str(path), "pretrained": False})
    with pytest.raises(ValueError, match=r"does not fit this model .*1 unexpected keys: meta_info$"):
        load_weights(dkm_small(h=64, w=96), dict(sd) | {"meta_info": "v1"})  # (no architecture to suggest)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        dkm_small(weights=tmp_path / "nope.pth")


def test_train_ckpt_brings_its_resolution_to_the_python_api(small, tmp_path, caplog):
    """A train.py .ckpt stores the model config it was trained with: ``dkm_small(weights=ckpt)`` and
    ``build_model({"arch", "weights"})`` build at its resolution (a .pth carries none); a resolution
    given explicitly holds, with a warning; another architecture is built as asked, with a warning."""
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in small.state_dict().items()},
                "hyper_parameters": {"model": {"arch": "dkm_small", "h": 64, "w": 96, "weights": None,
                                               "fast": False}}}, ckpt)
    assert (dkm_small(weights=ckpt).h_resized, dkm_small(weights=ckpt).w_resized) == (64, 96)
    built = zoo.build_model({"arch": "dkm_small", "weights": str(ckpt)})
    assert (built.h_resized, built.w_resized, built.fast) == (64, 96, True)  # fast: an inference choice
    caplog.clear()
    with caplog.at_level("WARNING", logger="dkm.models.zoo"):
        other = dkm_small(weights=ckpt, h=128, w=160)
    assert (other.h_resized, other.w_resized) == (128, 160)
    assert "trained with h=64, w=96; building with h=128, w=160" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dkm.models.zoo"), pytest.raises(ValueError, match="does not fit"):
        dkm_base(pretrained=False, weights=ckpt)
    assert "holds a dkm_small model" in caplog.text
    assert (dkm_small().h_resized, dkm_small().w_resized) == (192, 256)  # no checkpoint: the arch's default


@pytest.mark.parametrize("bad", [{"h": 0}, {"w": -5}, {"h": 64.0}, {"h": True}])
def test_resolution_is_checked_when_the_model_is_built(bad):
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r}: the internal resolution must be a positive int"):
        zoo.build_model({"arch": "dkm_small", **bad})
    with pytest.raises(ValueError, match=r"upsample_res=\(64,\)"):
        zoo.build_model({"arch": "dkmv3_indoor", "upsample_res": (64,)})


def test_unknown_official_version_is_refused_with_or_without_download():
    """``version`` selects the official download; a typo is refused even when nothing is downloaded."""
    with pytest.raises(ValueError, match=r"dkm_base version 'v2': official versions of dkm_base are \['v11'\]"):
        zoo.build_model({"arch": "dkm_base", "version": "v2"})
    with pytest.raises(ValueError, match=r"dkmv3_indoor version 'v11'"):
        zoo.build_model({"arch": "dkmv3_indoor", "version": "v11"})


def test_pretrained_offline_says_what_to_do(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as e:
        dkm_base(pretrained=True, version="v11")
    assert "dkm_base_v11.pth" in str(e.value) and "weights=" in str(e.value)


def test_backbone_not_downloaded_when_weights_given(monkeypatch, small, tmp_path):
    requested = []

    def resnet18(weights=None):
        requested.append(weights)
        if weights is not None:
            raise OSError("offline")
        return torchvision.models.resnet18(weights=None)

    monkeypatch.setitem(zoo._BACKBONES, "resnet18", resnet18)
    path = tmp_path / "w.pth"
    torch.save(small.state_dict(), path)
    dkm_small(weights=path, backbone_weights="imagenet")
    assert requested == [None]
    with pytest.raises(RuntimeError, match="backbone_weights=<path>"):
        zoo.make_backbone("resnet18", "imagenet")

    # a local backbone file: loaded strictly, a wrong one named with its offending keys
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    torch.testing.assert_close(zoo.make_backbone("resnet18", tmp_path / "r18.pth").conv1.weight, net.conv1.weight)
    with pytest.raises(ValueError, match=r"backbone_weights=.*r18.pth does not fit this model \(ResNet\): "
                                         r"198 missing keys: layer1.0.conv3.weight"):
        zoo.make_backbone("resnet50", tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="model config without 'arch'"):
        zoo.build_model({"weights": None})


def test_no_hard_coded_cuda_in_package():
    """Device-agnostic: tensors are created on the model's/input's device, never with .cuda()."""
    import dkm

    offenders = [str(p) for p in pathlib.Path(dkm.__file__).parent.rglob("*.py") if ".cuda(" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("support", ["fast", "native (no faster than float32)", "emulated"])
def test_reduced_precision_warns_once_where_it_is_no_faster(small, rgb, monkeypatch, caplog, support):
    import dkm.models.matcher as matcher

    monkeypatch.setattr(matcher, "reduced_precision_support", lambda device, dtype: support)
    small.__dict__.pop("_warned_dtypes", None)
    with caplog.at_level("WARNING", logger="dkm.models.matcher"):
        for _ in range(2):
            warp, _ = small.match(rgb, rgb, dtype=torch.bfloat16)
            assert warp.dtype == torch.float32 and torch.isfinite(warp).all()
        small.match(rgb, rgb)  # float32 never warns
    warnings = [r.getMessage() for r in caplog.records if "match(dtype=" in r.getMessage()]
    assert len(warnings) == (0 if support == "fast" else 1)
    if warnings:
        assert "AVX512-BF16 or AMX" in warnings[0]  # what the CPU would need
        assert ("float32 kernels on rounded operands" in warnings[0]) == (support == "emulated")  # (on CPU)
        assert "no faster than float32" in warnings[0]


@pytest.mark.parametrize("capability, bf16, fp16", [((6, 1), "emulated", "native (no faster than float32)"),
                                                    ((6, 0), "emulated", "fast"), ((7, 5), "emulated", "fast"),
                                                    ((8, 0), "fast", "fast"), ((9, 0), "fast", "fast")])
def test_cuda_reduced_precision_follows_the_compute_capability(monkeypatch, capability, bf16, fp16):
    """By the capability of the device asked about (torch.cuda.is_bf16_supported() also counts
    emulation and looks at the current device only)."""
    from dkm.utils.device import reduced_precision_support

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert reduced_precision_support("cuda:1", torch.bfloat16) == bf16
    assert reduced_precision_support("cuda:1", torch.float16) == fp16
    assert asked and all(torch.device(d) == torch.device("cuda:1") for d in asked)


def test_device_capabilities_are_described():
    from dkm.utils.device import cpu_description, cpu_has_native_bf16, cpu_has_native_fp16, reduced_precision_is_native

    assert reduced_precision_is_native("cpu", torch.float16) == cpu_has_native_fp16()
    assert reduced_precision_is_native("cpu", torch.bfloat16) == cpu_has_native_bf16()
    assert cpu_has_native_fp16() == torch.ops.mkldnn._is_mkldnn_fp16_supported()
    desc = cpu_description()
    assert torch.backends.cpu.get_cpu_capability() in desc and "bfloat16 " in desc and "float16 " in desc


@pytest.mark.skipif(not pathlib.Path("/proc/cpuinfo").exists() or platform.machine() != "x86_64",
                    reason="x86 Linux: /proc/cpuinfo flags")
def test_cpu_flags_are_this_machines():
    from dkm.utils.device import cpu_flags

    flags = cpu_flags()
    assert {"sse2", "fpu"} <= flags  # every x86-64 CPU
    capability = torch.backends.cpu.get_cpu_capability()  # torch may use less than the CPU has, never more
    assert {"AVX512": "avx512f", "AVX2": "avx2"}.get(capability[:6].rstrip("_"), "fpu") in flags, capability


@pytest.mark.parametrize("flags, native, faster", [
    # a Xeon with AMX-BF16 and AVX512-FP16 but no AMX-FP16 (Sapphire Rapids): bfloat16 pays off, float16 not
    ({"avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}, {torch.bfloat16, torch.float16}, {torch.bfloat16}),
    ({"avx512f", "amx_bf16", "amx_fp16", "avx512_fp16"}, {torch.bfloat16, torch.float16}, {torch.bfloat16, torch.float16}),
    # AVX-512 without BF16 (oneDNN converts through float32)
    ({"avx512f", "avx512bw"}, {torch.bfloat16}, set()),
    ({"avx2"}, set(), set()),  # AVX2 only: both emulated
    (set(), {torch.bfloat16}, {torch.bfloat16}),  # flags unknown: native counts as faster
])
def test_reduced_precision_is_faster_only_with_matrix_instructions(monkeypatch, flags, native, faster):
    import dkm.utils.device as device

    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: torch.bfloat16 in native)
    monkeypatch.setattr(device, "cpu_has_native_fp16", lambda: torch.float16 in native)
    for dtype in (torch.bfloat16, torch.float16):
        assert device.reduced_precision_is_native("cpu", dtype) == (dtype in native)
        assert device.reduced_precision_is_faster("cpu", dtype) == (dtype in faster), (flags, dtype)
        expected = "fast" if dtype in faster else "native (no faster than float32)" if dtype in native else "emulated"
        assert device.reduced_precision_support("cpu", dtype) == expected
    assert "float16 " + device.reduced_precision_support("cpu", torch.float16) in device.cpu_description()


def test_keep_freed_memory_applies_on_glibc_and_checks_its_arguments():
    """The allocator switch of evaluate.py (its speed effect is measured by bench/match_speed.py
    --malloc no-trim, not here): applied in a fresh process on glibc, C-int range enforced."""
    import platform
    import subprocess
    import sys

    from dkm.utils.device import keep_freed_memory

    with pytest.raises(ValueError, match="C int"):
        keep_freed_memory(trim_threshold=16 << 30)  # would silently wrap to 0 (= trim everything)
    code = "from dkm.utils.device import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.stdout.strip() == str(glibc)


@pytest.mark.parametrize("arch, dtype", [("v11", torch.bfloat16), ("v11", torch.float16), ("v3", torch.bfloat16)])
def test_precision_scope_decides_what_runs_in_reduced_precision(small, rgb, arch, dtype):
    """``precision_scope="refiners"`` (default): only the refiners' convolutions see ``dtype``;
    ``"network"``: the encoder, projections and embedding decoder too. Either way the GP's inputs, the
    embedding decoder's flow output and match()'s outputs are float32. (float16 on CPU takes the
    ``F.conv2d`` path that CUDA takes: oneDNN's fused kernels are for float32/bfloat16 only.)"""
    from dkm.models import decoder as decoder_module
    from dkm.models import encoder as encoder_module
    from dkm.models import fused
    from dkm.models.gp import GP

    model = small if arch == "v11" else zoo.build_model({"arch": "dkmv3_outdoor", "h": 64, "w": 96,
                                                         "upsample_res": [96, 128]}).eval()
    seen = {}  # part -> set of compute dtypes
    orig_conv2d_relu, orig_gp, orig_emb = fused.conv2d_relu, GP._mean, decoder_module.EmbeddingDecoder.forward

    def part_of(conv):
        if any(conv is m for m in model.encoder.modules()):
            return "encoder"
        return "refiners" if any(conv is m for m in model.decoder.conv_refiner.modules()) else "other"

    def conv_spy(x, weight, bias, conv, **kw):
        out = orig_conv2d_relu(x, weight, bias, conv, **kw)
        seen.setdefault(part_of(conv), set()).add(out.dtype)
        return out

    def gp_spy(self, x, y, fast):
        seen.setdefault("gp", set()).update({x.dtype, y.dtype})
        return orig_gp(self, x, y, fast)

    def emb_spy(self, gp_out, feats, state, scale, **kw):
        flow, cert, state = orig_emb(self, gp_out, feats, state, scale, **kw)
        seen.setdefault("embedding features", set()).add(feats.dtype)
        seen.setdefault("coarse flow", set()).update({flow.dtype, cert.dtype})
        return flow, cert, state

    mp = pytest.MonkeyPatch()
    try:
        for module in (fused, decoder_module, encoder_module):  # each module's own name for it
            mp.setattr(module, "conv2d_relu", conv_spy)
        mp.setattr(GP, "_mean", gp_spy)
        mp.setattr(decoder_module.EmbeddingDecoder, "forward", emb_spy)
        out = {}
        for scope in ("refiners", "network"):
            seen.clear()
            warp, cert = model.match(rgb, rgb, dtype=dtype, precision_scope=scope)
            assert warp.dtype == cert.dtype == torch.float32 and torch.isfinite(warp).all()
            out[scope] = dict(seen)
    finally:
        mp.undo()
    low, f32 = {dtype}, {torch.float32}
    assert out["refiners"]["refiners"] == low and out["network"]["refiners"] == low
    assert out["refiners"]["encoder"] == f32 and out["network"]["encoder"] == low
    assert out["refiners"]["embedding features"] == f32 and out["network"]["embedding features"] == low
    for scope in out:
        assert out[scope]["gp"] == f32 and out[scope]["coarse flow"] == f32
    with pytest.raises(ValueError, match="precision_scope"):
        model.match(rgb, rgb, dtype=torch.bfloat16, precision_scope="everything")
