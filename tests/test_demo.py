"""python -m dkm.demo: one pair in, pictures and sampled matches out (tiny random model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dkm import dkm_small
from dkm.demo import main
from dkm.viz import draw_matches


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.BILINEAR)
    a.save(d / "a.png")
    a.rotate(4).resize((150, 100)).save(d / "b.jpg")
    torch.manual_seed(0)
    torch.save(dkm_small(h=64, w=96).state_dict(), d / "small.pth")
    return d


def test_demo_writes_pictures_and_matches_in_the_original_pixels(pair, tmp_path):
    paths = main([str(pair / "a.png"), str(pair / "b.jpg"), "--arch", "dkm_small", "--h", "64", "--w", "96",
                  "--weights", str(pair / "small.pth"), "--num", "300", "--out", str(tmp_path), "--device", "cpu"])
    warp_png = np.asarray(Image.open(paths["warp"]))
    assert warp_png.shape == (64, 4 * 96, 3)  # A | B | B pulled back x certainty | certainty
    assert np.asarray(Image.open(paths["matches"])).shape == (120, 160 + 150, 3)
    z = np.load(paths["npz"])
    assert z["kpts_A"].shape == z["kpts_B"].shape and 0 < len(z["kpts_A"]) <= 300 and float(z["center"]) == 0.5
    # pixel coordinates of the original images (160x120 and 150x100), not of the internal 96x64 grid
    assert (z["kpts_A"] >= 0).all() and (z["kpts_A"] <= [160, 120]).all() and z["kpts_A"][:, 0].max() > 96
    assert (z["kpts_B"] >= 0).all() and (z["kpts_B"] <= [150, 100]).all()
    assert ((z["certainty"] > 0) & (z["certainty"] <= 1)).all()
    again = main([str(pair / "a.png"), str(pair / "b.jpg"), "--arch", "dkm_small", "--h", "64", "--w", "96",
                  "--weights", str(pair / "small.pth"), "--num", "300", "--out", str(tmp_path / "2"),
                  "--device", "cpu", "--center", "0"])
    z0 = np.load(again["npz"])
    np.testing.assert_allclose(z0["kpts_A"], z["kpts_A"] - 0.5, atol=1e-4)  # same seed, other pixel frame


def test_demo_keypoints_are_the_sampled_dense_matches_in_each_images_pixels(pair):
    from dkm.demo import match_pair

    torch.manual_seed(0)
    model = dkm_small(h=64, w=96, weights=pair / "small.pth")
    r = match_pair(model, pair / "a.png", pair / "b.jpg", num=50)
    # query keypoints sit on the internal 96x64 grid of pixel centres, in A's 160x120 pixels (centre 0.5):
    # x = (j + 0.5) * 160 / 96, y = (i + 0.5) * 120 / 64 for integers i, j
    j = r["kpts_A"][:, 0] * 96 / 160 - 0.5
    i = r["kpts_A"][:, 1] * 64 / 120 - 0.5
    np.testing.assert_allclose(j, np.round(j), atol=1e-3)
    np.testing.assert_allclose(i, np.round(i), atol=1e-3)
    # and each support keypoint is the dense warp at that query pixel, in B's 150x100 pixels: u = W (x + 1) / 2
    target = r["warp"][np.round(i).astype(int), np.round(j).astype(int), 2:].numpy()
    np.testing.assert_allclose(r["kpts_B"], (target + 1) / 2 * [150, 100], atol=1e-3)


def test_demo_needs_weights(pair, capsys):
    with pytest.raises(SystemExit):
        main([str(pair / "a.png"), str(pair / "b.jpg"), "--arch", "dkm_small"])
    assert "--weights" in capsys.readouterr().err



@pytest.mark.parametrize("flag,value", [("--num", "-5"), ("--lines", "-1"), ("--h", "0"), ("--w", "x")])
def test_demo_counts_are_checked_by_argparse(pair, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main([str(pair / "a.png"), str(pair / "b.jpg"), "--weights", str(pair / "small.pth"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and value in err, err


def test_draw_matches_puts_lines_where_the_keypoints_are():
    a, b = np.zeros((20, 30, 3), np.uint8), np.zeros((10, 40, 3), np.uint8)
    pic = draw_matches(a, b, np.array([[5.5, 5.5]]), np.array([[20.5, 5.5]]), np.array([1.0]))
    assert pic.shape == (20, 70, 3)
    assert pic[5, 5, 1] > 200 and pic[5, 30 + 20, 1] > 200 and pic[5, 5, 0] < 50  # certain: green
    assert pic[15, 40:].sum() == 0  # below image B: untouched
    # the same keypoints with pixel centres at integers (OpenCV's convention) draw the same picture
    assert np.array_equal(draw_matches(a, b, np.array([[5.0, 5.0]]), np.array([[20.0, 5.0]]), np.array([1.0]),
                                       center=0.0), pic)
    # and center is not ignored: the same points a whole pixel further along the grid draw elsewhere
    assert not np.array_equal(draw_matches(a, b, np.array([[5.5, 5.5]]), np.array([[20.5, 5.5]]), np.array([1.0]),
                                           center=1.5), pic)
    with pytest.raises(ValueError, match="kpts_A and kpts_B"):
        draw_matches(a, b, np.zeros((3, 2)), np.zeros((2, 2)))


def test_symmetric_warps_are_drawn_from_their_first_half(tmp_path):
    """DKMv3 returns (H, 2W, 4): [grid_A, A->B | B->A, grid_B]; warp.png shows the A -> B half."""
    from dkm.demo import save_pictures
    from dkm.geometry.coords import normalized_grid

    grid = normalized_grid(8, 12)
    warp = torch.cat((torch.cat((grid, grid), -1), torch.cat((grid, grid), -1)), dim=1)  # identity both ways
    A = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8))
    result = {"A": A, "B": A, "warp": warp, "certainty": torch.ones(8, 24), "symmetric": True,
              "kpts_A": np.array([[1.5, 2.5]]), "kpts_B": np.array([[1.5, 2.5]]), "sparse_certainty": np.ones(1)}
    panel = np.asarray(Image.open(save_pictures(result, tmp_path)["warp"])).astype(int)
    assert panel.shape == (8, 4 * 12, 3)
    # identity warp with certainty 1: the pulled-back B equals A (up to bilinear sampling at pixel centres)
    assert np.abs(panel[:, 24:36] - panel[:, :12]).max() <= 1


def test_demo_builds_a_train_py_checkpoint_as_trained(pair, tmp_path, capsys):
    """A Lightning ``.ckpt`` of train.py carries its model config: the demo builds that architecture
    at that resolution without --arch/--h/--w; a missing image fails before any model is built."""
    sd = torch.load(pair / "small.pth", weights_only=True)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()},
                "hyper_parameters": {"model": {"arch": "dkm_small", "h": 64, "w": 96}}}, ckpt)
    paths = main([str(pair / "a.png"), str(pair / "b.jpg"), "--weights", str(ckpt), "--num", "50",
                  "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert np.asarray(Image.open(paths["warp"])).shape == (64, 4 * 96, 3)
    with pytest.raises(SystemExit):
        main([str(pair / "missing.png"), str(pair / "b.jpg"), "--weights", str(ckpt)])
    assert "image file not found" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "taken").write_text("a file")
    for argv, expected in (([str(tmp_path / "notes.png"), str(pair / "b.jpg")], "notes.png is not a readable image"),
                           ([str(pair / "a.png"), str(pair / "b.jpg"), "--out", str(tmp_path / "taken")],
                            "taken exists and is not a folder")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--weights", str(ckpt)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err and "Traceback" not in err, err
