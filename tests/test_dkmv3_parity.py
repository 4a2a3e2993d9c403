"""DKMv3: checkpoint contract and numerical parity with the release (../shared/fixtures/dkmv3_parity.npz).

The model runs at the fixture's 384x512 (upsampling pass at 576x768). Two module-level matches feed
most tests: the faithful path without upsampling and the fast path with upsampling; the encoder's
inputs and the decoder's outputs at every scale are captured during those calls (hooks), so nothing
runs twice.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_weight_sums, load_npz, state_dict_signature
from PIL import Image

from dkm import DKMv3_indoor, DKMv3_outdoor
from dkm.geometry.coords import normalized_grid
from dkm.models.sampling import balance_probabilities, kde_density, threshold_weights
from dkm.utils.synthetic_weights import state_dict_digest, synthetic_state_dict

V3_DIGEST = "5677f7f8af248bd544db3a5b5e75693e9ec0025413159ebb59168ddad99412ec"
FLOW_TOL, LOGIT_TOL, CERT_TOL = 2e-4, 2e-3, 5e-4
SCALES = (32, 16, 8, 4, 2, 1)


@pytest.fixture(scope="module")
def keys(fixtures_dir):
    path = fixtures_dir / "dkmv3_keys.json"
    if not path.exists():
        pytest.skip(f"fixture {path} not found")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ref(fixtures_dir):
    return load_npz(fixtures_dir, "dkmv3_parity.npz")


@pytest.fixture(scope="module")
def model(keys):
    weights = synthetic_state_dict({n: s for n, s, _ in keys}, seed=0)
    return DKMv3_outdoor(weights=weights, h=384, w=512, upsample_res=(576, 768))


def _match_capturing(model, ref, *, fast, upsample):
    """match(im1, im2) and every decoder output it produced: [(upsample pass?, {scale: (flow, cert)})]."""
    calls = []

    def hook(_module, _args, kwargs, out):
        calls.append((bool(kwargs.get("upsample")), {s: (o["dense_flow"].clone(), o["dense_certainty"].clone())
                                                     for s, o in out.items()}))

    inputs = []
    handles = [model.decoder.register_forward_hook(hook, with_kwargs=True),
               model.encoder.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))]
    encode_fast = model._encode_fast  # the fast path's encoder entry (Encoder.forward_fused, no module call)

    def capture_fast(*images, **kwargs):
        inputs.extend(x.clone() for x in images)
        return encode_fast(*images, **kwargs)

    old = model.upsample_preds
    model.upsample_preds = upsample
    model._encode_fast = capture_fast
    try:
        warp, cert = model.match(Image.fromarray(ref["im1"]), Image.fromarray(ref["im2"]), fast=fast)
    finally:
        model.upsample_preds = old
        del model._encode_fast
        for h in handles:
            h.remove()
    return warp, cert, calls, inputs


@pytest.fixture(scope="module")
def faithful_noup(model, ref):
    return _match_capturing(model, ref, fast=False, upsample=False)


@pytest.fixture(scope="module")
def fast_up(model, ref):
    return _match_capturing(model, ref, fast=True, upsample=True)


def _both_directions(calls, upsample):
    """Per scale, the (2, ...) [q->s, s->q] outputs of the (first or upsampling) pass."""
    sel = [c for up, c in calls if up == upsample]
    return {s: tuple(torch.cat([c[s][i] for c in sel]).numpy() for i in (0, 1)) for s in sel[0]}


# ---------------------------------------------------------------------------- checkpoint contract
def test_state_dict_keys_shapes_and_order_match_release(keys):
    for make in (DKMv3_outdoor, DKMv3_indoor):
        with torch.device("meta"):
            m = make(pretrained=False)
        assert state_dict_signature(m) == keys
        assert sum(p.numel() for p in m.parameters()) == 72_261_090


def test_synthetic_weights_follow_fixture_recipe(keys, ref):
    sd = synthetic_state_dict({n: s for n, s, _ in keys}, seed=0)
    assert state_dict_digest(sd) == V3_DIGEST
    assert_weight_sums(sd, ref)


def test_release_defaults(model):
    with torch.device("meta"):
        out, ind = DKMv3_outdoor(pretrained=False), DKMv3_indoor(pretrained=False)
    assert (out.h_resized, out.w_resized, ind.h_resized, ind.w_resized) == (540, 720, 480, 640)
    assert (out.upsample_preds, ind.upsample_preds, out.upsample_res, ind.upsample_res) == (
        True, False, (864, 1152), (864, 1152))
    assert model.symmetric and model.upsample_preds and model.sample_mode == "threshold_balanced"
    assert model.sample_thresh == 0.05 and model.version == "v3"
    assert type(model.encoder.net).__name__ == "ResNet"


# ---------------------------------------------------------------------------- network parity
@pytest.mark.parametrize("path", ["faithful", "fast"])
@pytest.mark.slow  # ~1 min in total on 2 cores: two DKMv3 matches shared by these tests
def test_symmetric_first_pass_matches_release_at_every_scale(path, faithful_noup, fast_up, ref):
    calls = (faithful_noup if path == "faithful" else fast_up)[2]
    got = _both_directions(calls, upsample=False)
    assert sorted(got) == sorted(SCALES)
    for s in SCALES:
        np.testing.assert_allclose(got[s][0], ref[f"flow_s{s}"], rtol=0, atol=FLOW_TOL, err_msg=f"flow s{s}")
        np.testing.assert_allclose(got[s][1], ref[f"cert_s{s}"], rtol=0, atol=LOGIT_TOL, err_msg=f"cert s{s}")


@pytest.mark.slow  # ~1 min in total on 2 cores: two DKMv3 matches shared by these tests
def test_upsampling_pass_matches_release(fast_up, ref):
    got = _both_directions(fast_up[2], upsample=True)
    assert sorted(got) == [1, 2, 4, 8] and got[1][0].shape == (2, 2, 576, 768)
    for s in (8, 4):
        np.testing.assert_allclose(got[s][0], ref[f"up_flow_s{s}"], rtol=0, atol=FLOW_TOL, err_msg=f"flow s{s}")
        np.testing.assert_allclose(got[s][1], ref[f"up_cert_s{s}"], rtol=0, atol=LOGIT_TOL, err_msg=f"cert s{s}")


def test_match_preprocessing_matches_release(faithful_noup, fast_up, ref):
    """The encoder sees exactly the release's inputs: PIL bicubic resizes of the original images, at
    384x512 for the first pass and 576x768 for the upsampling pass (not a resize of the 384x512 ones)."""
    first = np.concatenate((ref["query"], ref["support"]))
    up = np.concatenate((ref["query_up"], ref["support_up"]))
    (x,) = faithful_noup[3]
    np.testing.assert_array_equal(x.numpy(), first)
    # the fast path: query and support through the encoder separately, then the same at the upsampling size
    x_q, x_s, x_q_up, x_s_up = fast_up[3]
    np.testing.assert_array_equal(np.concatenate((x_q.numpy(), x_s.numpy())), first)
    np.testing.assert_array_equal(np.concatenate((x_q_up.numpy(), x_s_up.numpy())), up)


@pytest.mark.slow  # ~1 min in total on 2 cores: two DKMv3 matches shared by these tests
def test_match_with_upsampling_matches_release(fast_up, ref):
    warp, cert = fast_up[:2]
    assert warp.shape == (576, 1536, 4) and cert.shape == (576, 1536)
    np.testing.assert_allclose(warp.numpy(), ref["match_warp"], rtol=0, atol=FLOW_TOL)
    np.testing.assert_allclose(cert.numpy(), ref["match_cert"], rtol=0, atol=CERT_TOL)


@pytest.mark.slow  # ~1 min in total on 2 cores: two DKMv3 matches shared by these tests
def test_match_without_upsampling_matches_release(faithful_noup, ref):
    warp, cert = faithful_noup[:2]
    assert warp.shape == (384, 1024, 4) and cert.shape == (384, 1024)
    np.testing.assert_allclose(cert.numpy(), ref["match_noup_cert"], rtol=0, atol=CERT_TOL)
    # layout: [grid_q, q->s | s->q, grid_s], flows clamped to [-1, 1]
    grid = normalized_grid(384, 512).numpy()
    flow = np.clip(ref["flow_s1"], -1, 1).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(warp[:, :512, :2].numpy(), grid)
    np.testing.assert_array_equal(warp[:, 512:, 2:].numpy(), grid)
    np.testing.assert_allclose(warp[:, :512, 2:].numpy(), flow[0], rtol=0, atol=FLOW_TOL)
    np.testing.assert_allclose(warp[:, 512:, :2].numpy(), flow[1], rtol=0, atol=FLOW_TOL)


def test_certainty_rules_on_constructed_predictions(model):
    """Coarse logit term (note the sign) and zero certainty outside the other image."""
    flow = normalized_grid(4, 6, batch=2).permute(0, 3, 1, 2).clone()
    flow[0, 0, 1, 2] = 1.5  # q->s leaves the support image at one pixel
    cert = torch.zeros(2, 1, 4, 6)
    cert16 = torch.tensor([-2.0, 3.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 3)
    m, c = model._finalize_v3(flow, cert, cert16)
    assert m.shape == (1, 4, 12, 4) and c.shape == (1, 4, 12)
    assert c[0, 1, 2] == 0 and m[0, 1, 2, 2] == 1.0
    expected_q = torch.sigmoid(torch.tensor(1.0))  # 0 - 0.5 * (-2)
    assert torch.isclose(c[0, 0, 0], expected_q) and torch.isclose(c[0, 0, 6], torch.tensor(0.5))


# ---------------------------------------------------------------------------- balanced sampling
def test_threshold_weights_are_exact(ref):
    got = threshold_weights(torch.from_numpy(ref["match_cert"]), 0.05).numpy()
    np.testing.assert_array_equal(got, ref["samp_weights"])
    got = threshold_weights(torch.from_numpy(ref["samp_small_cert_in"]), 0.05).numpy()
    np.testing.assert_array_equal(got, ref["samp_small_weights"])
    assert (ref["samp_small_weights"] < 1).any() and (ref["samp_small_weights"] == 1).any()


def test_kde_density_and_balanced_probabilities(ref):
    x = torch.from_numpy(ref["match_warp"]).reshape(-1, 4)[torch.from_numpy(ref["samp_idx"])]
    rows = torch.arange(0, x.shape[0], 20)  # 2000 of the 40000 rows, against all 40000 candidates
    dens = kde_density(x, std=0.1, at=x[rows])
    np.testing.assert_allclose(dens.numpy(), ref["samp_density"][rows.numpy()], rtol=1e-4)
    p = balance_probabilities(torch.from_numpy(ref["samp_density"]))
    np.testing.assert_allclose(p.numpy(), ref["samp_p"], rtol=1e-4)
    # the small case covers the density < 10 branch, on the full chain
    xs = torch.from_numpy(ref["match_warp"]).reshape(-1, 4)[torch.from_numpy(ref["samp_small_idx"])]
    ds = kde_density(xs, std=0.1, max_elements=2000 * 300)  # blocks of 300 rows: chunking changes nothing
    np.testing.assert_allclose(ds.numpy(), ref["samp_small_density"], rtol=1e-4)
    ps = balance_probabilities(ds).numpy()
    np.testing.assert_array_equal(ps == np.float32(1e-7), ref["samp_small_p"] == np.float32(1e-7))
    assert (ref["samp_small_p"] == np.float32(1e-7)).any() and (ref["samp_small_p"] > 1e-6).any()
    np.testing.assert_allclose(ps, ref["samp_small_p"], rtol=1e-4)


def test_balanced_sample_is_seeded_and_without_replacement(model, ref):
    warp = torch.from_numpy(ref["match_warp"])
    cert = torch.from_numpy(ref["samp_small_cert_in"])
    m1, c1 = model.sample(warp, cert, 500, generator=torch.Generator().manual_seed(0))
    m2, c2 = model.sample(warp, cert, 500, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m1, m2, rtol=0, atol=0)
    assert m1.shape == (500, 4) and c1.shape == (500,)
    assert len({tuple(r) for r in m1.tolist()}) == 500  # without replacement
    # samples come from the candidates with positive weight (isolated matches: tests/test_dkmv3_api.py)
    assert (c1 > 0).all()
    n1, _ = type(model).sample(warp.numpy(), cert.numpy(), 7)  # the class-level call: v11 proportional
    assert isinstance(n1, np.ndarray) and n1.shape == (7, 4)


# ---------------------------------------------------------------------------- construction API
def test_configs_build_the_release_models():
    from pathlib import Path

    from omegaconf import OmegaConf

    from dkm import build_model

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    expected = {"dkmv3_outdoor": (540, 720, True, (864, 1152)), "dkmv3_indoor": (480, 640, False, (864, 1152))}
    for arch, (h, w, up, res) in expected.items():
        cfg = OmegaConf.load(conf / f"{arch}.yaml")
        cfg.backbone_weights = None
        with torch.device("meta"):
            m = build_model(cfg)
        assert (m.h_resized, m.w_resized, m.upsample_preds, m.upsample_res) == (h, w, up, res)
        assert m.symmetric and m.sample_mode == "threshold_balanced" and m.version == "v3"


def test_offline_pretrained_download_fails_with_a_clear_message(monkeypatch):
    import urllib.error

    def offline(*_a, **_k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"DKMv3_indoor\.pth.*weights="):
        DKMv3_indoor()
    with pytest.raises(RuntimeError, match=r"DKMv3_outdoor\.pth"):
        DKMv3_outdoor(pretrained=True)


def test_v11_options_are_rejected_for_dkmv3(model, ref):
    im = Image.fromarray(ref["im1"])
    with pytest.raises(ValueError, match="check_cycle_consistency"):
        model.match(im, im, check_cycle_consistency=True)
