"""imagepiece.vis and `imagepiece visualize`: files, partitions, clear errors, no partial files."""

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from imagepiece.analysis import AnalysisError
from imagepiece.cli import app
from imagepiece.vis import VisError, trace_image, visualize

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=4)
TINY_ARGS = [a for k, v in TINY.items() if k != "num_classes" for a in ("--model-arg", f"{k}={v}")]


def tiny(**overrides):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, **overrides}).eval()


def make_image(path, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = (90, 160, 230)
    arr[size[1] // 2:] = (60, 150, 60)
    arr[5:15, 8:30] = (200, 30, 20)
    arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def files_in(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.parametrize("overrides", [{}, dict(class_token=False, global_pool="avg")],
                         ids=["cls", "no_cls"])
def test_visualize_writes_pngs_and_contact_sheet(tmp_path, overrides):
    a = make_image(tmp_path / "a.png")
    b = make_image(tmp_path / "b.jpg", seed=1)
    out = tmp_path / "out"
    methods = ["tome", "evit", "imagepiece", "imagepiece+tome", "imagepiece-discard"]
    paths = visualize(tiny(**overrides), [a, b], methods, str(out), blocks=[0, 1, 3])
    assert [os.path.basename(p) for p in paths] == ["a.png", "b.png", "contact_sheet.png"]
    for p in paths:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
    assert not [f for f in files_in(out) if f.startswith(".tmp")]


def test_single_image_to_png_file(tmp_path):
    a = make_image(tmp_path / "a.png")
    target = tmp_path / "figure.png"
    assert visualize(tiny(), [a], ["evit:keep_rate=0.5"], str(target)) == [str(target)]
    with Image.open(target) as im:
        assert im.width > 300


def test_partitions():
    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    patches = 64
    tome = trace_image(model, x, "tome:r=8", [0, 3])
    for bv in tome.blocks:  # every patch belongs to exactly one token; one label per token
        assert (bv.labels >= 0).all()
        assert len(np.unique(bv.labels)) == bv.tokens_out - 1
        assert not bv.fused.any()
        assert bv.attention is not None and bv.attention.shape == (8, 8)
    evit = trace_image(model, x, "evit", [1, 3])
    first = evit.blocks[0]
    assert first.kind == "prune" and (first.labels >= 0).all()
    kept = first.tokens_out - 2  # minus class token and fused token
    assert first.fused.sum() == patches - kept
    assert evit.blocks[1].fused.any()  # the fused token is still marked later
    discard = trace_image(model, x, "imagepiece-discard", [3])
    assert (discard.blocks[0].labels < 0).any() and not discard.blocks[0].fused.any()


def test_bad_image_is_a_clear_error_and_writes_nothing(tmp_path):
    good = make_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    out = tmp_path / "out"
    with pytest.raises(VisError, match="cannot read image"):
        visualize(tiny(), [good, str(bad)], ["tome"], str(out))
    assert files_in(out) == []
    with pytest.raises(VisError, match="does not exist"):
        visualize(tiny(), [str(tmp_path / "missing.png")], ["tome"], str(out))


def test_model_plan_mismatch(tmp_path):
    good = make_image(tmp_path / "good.png")
    out = tmp_path / "out"
    with pytest.raises(AnalysisError, match="does not fit"):
        visualize(tiny(), [good], ["evit:blocks=9"], str(out))
    with pytest.raises(VisError, match="out of range"):
        visualize(tiny(), [good], ["tome"], str(out), blocks=[7])
    assert files_in(out) == []


def test_cli_visualize(tmp_path):
    runner = CliRunner()
    good = make_image(tmp_path / "good.png")
    out = tmp_path / "vis"
    res = runner.invoke(app, ["visualize", good, *TINY_ARGS, "--method", "tome",
                              "--method", "imagepiece", "--blocks", "0,2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert files_in(out) == ["good.png"]
    bad = tmp_path / "bad.gif"
    bad.write_bytes(b"GIF89a broken")
    out2 = tmp_path / "vis2"
    res = runner.invoke(app, ["visualize", good, str(bad), *TINY_ARGS, "--out", str(out2)])
    assert res.exit_code == 2
    assert "cannot read image" in res.output
    assert files_in(out2) == []
    res = runner.invoke(app, ["visualize", good, *TINY_ARGS, "--method", "bogus", "--out", str(out2)])
    assert res.exit_code == 2 and "unknown method" in res.output
    assert files_in(out2) == []
