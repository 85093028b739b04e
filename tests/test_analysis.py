"""imagepiece.analysis and `imagepiece analyze`: files, value ranges and direction checks."""

import csv
import json
import os

import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from imagepiece import analysis as A
from imagepiece.cli import app

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=4)
TINY_ARGS = [a for k, v in TINY.items() if k != "num_classes" for a in ("--model-arg", f"{k}={v}")]


def tiny(**overrides):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, **overrides}).eval()


@pytest.fixture(scope="module")
def trained():
    """A tiny ViT trained for about a second on easy synthetic data, and a held-out split."""
    model = A.quick_train(tiny(), A.SyntheticImages(256, 4, 32, seed=0), steps=60)
    return model, A.SyntheticImages(64, 4, 32, seed=0, offset=99_999)


def check_files(paths, n_rows):
    for ext in ("csv", "json", "png"):
        assert os.path.isfile(paths[ext])
    with Image.open(paths["png"]) as im:
        im.verify()
        assert im.format == "PNG"
    with open(paths["csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == n_rows
    with open(paths["json"]) as f:
        assert len(json.load(f)["rows"]) == n_rows


def test_random_masks():
    x = torch.ones(3, 3, 32, 32)
    assert torch.equal(A.random_masks(x, 0, 4), x)
    a = A.random_masks(x, 10, 4, fill=-1.0, seed=3)
    assert torch.equal(a, A.random_masks(x, 10, 4, fill=-1.0, seed=3))  # seeded
    assert not torch.equal(a, A.random_masks(x, 10, 4, fill=-1.0, seed=4))
    masked = (a == -1).float().mean().item()
    assert 0 < masked <= 10 * 16 / 1024
    assert (a == -1).all(dim=1).eq((a == -1).any(dim=1)).all()  # all channels together
    more = (A.random_masks(x, 50, 4, fill=-1.0, seed=3) == -1).float().mean().item()
    assert more > masked
    al = A.random_masks(torch.ones(1, 1, 32, 32), 20, 4, fill=0.0, seed=1, aligned=True)[0, 0]
    blocks = al.reshape(8, 4, 8, 4).permute(0, 2, 1, 3).reshape(64, 16)
    assert ((blocks == 0).all(1) | (blocks == 1).all(1)).all()  # whole 4x4 cells only
    assert A.default_mask_size(224) == 16 and A.default_mask_size(32) == 2
    with pytest.raises(A.AnalysisError):
        A.random_masks(x, 1, 40)


def test_masking_robustness(trained, tmp_path):
    model, val = trained
    res = A.masking_robustness(model, val, ["none", "evit", "imagepiece"], counts=[0, 10, 50],
                               mask_size=4, seed=0)
    assert len(res.rows) == 9
    assert all(0 <= r["top1"] <= 100 for r in res.rows)  # percent, as eval and tune
    acc = {(r["method"], r["masks"]): r["top1"] for r in res.rows}
    assert acc[("none", 0)] >= 90  # the task is easy
    for m in ("none", "evit", "imagepiece"):
        assert acc[(m, 50)] < acc[(m, 0)]
    check_files(A.save_result(res, str(tmp_path)), 9)


def test_attentiveness(trained, tmp_path):
    model, val = trained
    res = A.attentiveness_change(model, val, ["evit", "imagepiece", "tome"])
    assert len(res.rows) == 3 * 3  # three methods, depth-1 pairs
    for r in res.rows:
        assert 0 <= r["inattentive_to_attentive"] <= 1
        assert 0 <= r["share_of_all_tokens"] <= r["inattentive_to_attentive"] + 1e-9
    # With the plan's keep rate, the tokens EViT's pruning drops at block l are exactly the
    # inattentive ones and are gone at l + 1.
    evit_prune = [r for r in res.rows if r["method"] == "evit" and r["kind"] == "prune"]
    assert evit_prune and all(r["inattentive_to_attentive"] == 0 for r in evit_prune)
    check_files(A.save_result(res, str(tmp_path)), 9)


def test_merged_similarity(trained, tmp_path):
    model, val = trained
    res = A.merged_similarity(model, val, ["tome:r=4", "imagepiece"])
    tome = [r for r in res.rows if r["method"] == "tome:r=4"]
    assert [r["block"] for r in tome] == [0, 1, 2, 3]
    assert all(-1 <= r["similarity"] <= 1 and r["pairs"] > 0 for r in res.rows)
    first_last = res.meta["first_last"]
    assert set(first_last) == {"tome:r=4", "imagepiece"}
    # ToMe merges the most similar pairs first: merged pairs are more similar than random ones.
    assert first_last["tome:r=4"]["first"] > 0
    check_files(A.save_result(res, str(tmp_path)), len(res.rows))
    with pytest.raises(A.AnalysisError, match="merges no tokens"):
        A.merged_similarity(model, val, ["evit"])


def test_important_merged(trained, tmp_path):
    model, val = trained
    res = A.important_merged(model, val, ["tome:r=8"], tops=[0.15, 0.3, 0.7, 1.0])
    shares = [r["share_merged_in_top"] for r in res.rows]
    assert all(0 <= s <= 1 for s in shares)
    assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0)
    assert res.rows[0]["block"] == 0 and res.rows[0]["merged_tokens"] > 0
    # r pairs merge per image, so between r + 1 and 2r tokens take part in a merge.
    assert 9 * len(val) <= res.rows[0]["merged_tokens"] <= 16 * len(val)
    check_files(A.save_result(res, str(tmp_path)), 4)


def test_keep_rate_sweep_and_report(trained, tmp_path):
    model, val = trained
    res = A.keep_rate_sweep(model, val, ["evit", "tome", "imagepiece"], keep_rates=[0.5, 0.9])
    assert res.rows[0]["variant"] == "none"
    assert len(res.rows) == 1 + 2 + 2 + 2
    assert all(0 <= r["top1"] <= 100 and r["images_per_s"] > 0 for r in res.rows)
    evit = {r["value"]: r["final_tokens"] for r in res.rows if r["method"] == "evit"}
    assert evit[0.5] < evit[0.9] < res.rows[0]["final_tokens"]
    check_files(A.save_result(res, str(tmp_path)), 7)
    A.save_result(A.important_merged(model, val), str(tmp_path))
    text = open(A.write_report(str(tmp_path))).read()
    assert "Figure 3" in text and "Table 7" in text and "![sweep](sweep.png)" in text
    assert "| method |" in text


def test_build_data():
    ds = A.build_data("synthetic", "val", 32, 3, length=10)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and len(ds) == 10 and 0 <= y < 3
    with pytest.raises(A.AnalysisError):
        A.build_data("/no/such/folder", "val", 32, 3)


def test_cli_analyze(tmp_path):
    runner = CliRunner()
    out = tmp_path / "an"
    common = ["analyze", *TINY_ARGS, "--num-classes", "4", "--length", "16", "--out", str(out)]
    res = runner.invoke(app, [*common, "masking", "--counts", "0,5", "--method", "none",
                              "--method", "evit", "--mask-size", "4", "--aligned"])
    assert res.exit_code == 0, res.output
    assert {"masking.csv", "masking.json", "masking.png"} <= set(os.listdir(out))
    res = runner.invoke(app, [*common, "similarity", "--method", "tome:r=4"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*common, "report"])
    assert res.exit_code == 0 and os.path.isfile(out / "report.md")
    res = runner.invoke(app, [*common, "masking", "--method", "evit:blocks=9"])
    assert res.exit_code == 2 and "does not fit" in res.output
    res = runner.invoke(app, ["analyze", "--data", "/no/such/dir", "--out", str(tmp_path / "x"),
                              *TINY_ARGS, "sweep"])
    assert res.exit_code == 2 and "error" in res.output
    assert not os.path.exists(tmp_path / "x")


def test_cli_analyze_refuses_weights_it_would_not_use_on_a_shipped_model(tmp_path):
    """A shipped model comes with its weights: --checkpoint is refused, not silently ignored."""
    out = tmp_path / "an"
    common = ["analyze", "--data", "synthetic", "--length", "4", "--out", str(out)]
    res = CliRunner().invoke(app, [*common, "--model", "shipped:baseline", "--checkpoint", "w.pth",
                                   "masking"])
    assert res.exit_code == 2 and "apply to timm names" in res.output, res.output
    res = CliRunner().invoke(app, [*common, "--model", "shipped:nope", "masking"])
    assert res.exit_code == 2 and "unknown shipped model 'nope'" in res.output, res.output
    assert not os.path.exists(out)


def test_checkpoint_is_loaded_safely(tmp_path):
    from safetensors.torch import save_file

    model = tiny()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = A.load_model("vit_tiny_patch16_224", {k: v for k, v in TINY.items()}, str(path), seed=5)
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(A.AnalysisError, match="checkpoint"):
        A.load_model("vit_tiny_patch16_224", TINY, str(tmp_path / "missing.pth"))


def test_sweep_json_is_strict_json(tmp_path):
    """The unmodified model's row has no knob value (NaN in memory): null in the file, never NaN."""
    result = A.keep_rate_sweep(tiny(), A.SyntheticImages(8, 4, 32), methods=["evit"], keep_rates=[0.5],
                               batch_size=8, repeats=1)
    A.save_result(result, str(tmp_path))
    text = (tmp_path / "sweep.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in sweep.json"))
    assert data["rows"][0]["value"] is None
    with open(A.write_report(str(tmp_path))) as f:
        assert "| - |" in f.read()  # shown as '-'


def test_attentiveness_refuses_keep_rate_zero():
    """0 used to be read as "the plan's keep rate" while the JSON recorded 0.0."""
    with pytest.raises(A.AnalysisError, match="keep_rate=0"):
        A.attentiveness_change(tiny(), A.SyntheticImages(8, 4, 32), ["evit"], keep_rate=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_analyses_run_on_a_gpu_model():
    model, ds = tiny().cuda(), A.SyntheticImages(16, 4, 32)
    cpu = A.masking_robustness(tiny(), ds, ["evit"], counts=[0, 3])
    gpu = A.masking_robustness(model, ds, ["evit"], counts=[0, 3])
    assert [r["top1"] for r in gpu.rows] == pytest.approx([r["top1"] for r in cpu.rows], abs=7)
    A.attentiveness_change(model, ds, ["imagepiece"])
    A.merged_similarity(model, ds, ["tome"])
    A.important_merged(model, ds, ["tome"])
    A.keep_rate_sweep(model, ds, methods=["evit"], keep_rates=[0.5], repeats=1)


def test_cli_sweep_on_a_transformers_folder_with_its_own_preprocessing(tmp_path):
    """A transformers folder has no ``num_classes`` nor timm's attributes: the sweep reads the
    family-agnostic description, scores its logits and prepares images from its folder."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from imagepiece.cli import app

    T = pytest.importorskip("transformers")
    T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            image_size=32, patch_size=8, intermediate_size=64,
                                            num_labels=2)).save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(dict(
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 32, "width": 32})))
    for c in ("a", "b"):
        (tmp_path / "data" / "val" / c).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "data" / "val" / c / "x.png")
    res = CliRunner().invoke(app, ["analyze", "--model", str(tmp_path / "vit"), "--data",
                                   f"imagefolder:{tmp_path / 'data'}", "--out", str(tmp_path / "out"),
                                   "sweep", "--keep-rates", "0.7", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "mean (0.5, 0.5, 0.5)" in res.output and "preprocessor_config.json" in res.output
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"none", "evit", "tome", "imagepiece"}
    assert all(r["top1"] in (0.0, 50.0, 100.0) for r in rows)  # percent of 2 images
