"""Evaluation: exact metrics, several plans on the same weights, CLI table/JSON, torchrun."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from imagepiece.cli import app
from imagepiece.evaluate import EvalConfig, EvalError, evaluate_model, evaluate_plans
from imagepiece.train import resolve_config, train

KW = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)
DATA = ["--dataset", "synthetic", "--data-length", "40", "--workers", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Fast and steady on a shared 2-core machine; restored for the other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 1-epoch training run (weights + saved config) shared by the tests here."""
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("eval")
    cfg = resolve_config(overrides=dict(
        model="vit_tiny_patch16_224", model_kwargs=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2),
        dataset="synthetic", data_length=32, epochs=1, batch_size=16, workers=0, threads=1,
        progress=False, output=str(out), name="run"))
    train(cfg)
    torch.set_num_threads(before)
    return str(out / "run")


def test_evaluate_model_counts_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 6)
    x, y = torch.randn(25, 4), torch.randint(0, 6, (25,))
    res = evaluate_model(model, DataLoader(TensorDataset(x, y), batch_size=7))
    logits = model(x)
    assert res["images"] == 25
    assert res["top1"] == pytest.approx(100 * (logits.argmax(-1) == y).float().mean().item())
    top5 = (logits.topk(5, -1).indices == y[:, None]).any(-1).float().mean().item()
    assert res["top5"] == pytest.approx(100 * top5)
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_plans_side_by_side_on_the_same_weights(run_dir):
    cfg = EvalConfig(checkpoint=run_dir, methods=("none", "evit", "evit:keep_rate=1.0", "tome:r=2",
                                                  "imagepiece"),
                     dataset="synthetic", data_length=40, workers=0, batch_size=16)
    result = evaluate_plans(cfg)
    rows = {r["method"]: r for r in result["results"]}
    assert result["model"] == "vit_tiny_patch16_224" and result["images"] == 40
    assert list(rows) == list(cfg.methods)
    # keep rate 1 is the unmodified model (docs/methods.md, EViT)
    assert rows["evit:keep_rate=1.0"]["top1"] == rows["none"]["top1"]
    assert rows["evit:keep_rate=1.0"]["loss"] == pytest.approx(rows["none"]["loss"], rel=1e-5)
    assert rows["none"]["speedup"] == 1.0
    assert all(r["images_per_s"] > 0 for r in rows.values())


def test_evaluate_errors(run_dir, tmp_path):
    with pytest.raises(EvalError, match="no model given"):
        evaluate_plans(EvalConfig(dataset="synthetic"))
    with pytest.raises(EvalError, match="unknown model"):
        evaluate_plans(EvalConfig(model="vit_nope", dataset="synthetic"))
    with pytest.raises(ValueError, match="unknown method 'evitt'"):
        evaluate_plans(EvalConfig(checkpoint=run_dir, methods=("evitt",), dataset="synthetic"))


def test_imagepiece_model_and_timm_checkpoint(tmp_path):
    # a registered imagepiece_* model, weights given as a timm-style .pth
    torch.manual_seed(0)
    model = timm.create_model("imagepiece_deit_tiny_patch16_224", plan="none", **KW)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth.tar")
    cfg = EvalConfig(model="imagepiece_deit_tiny_patch16_224", checkpoint=str(tmp_path / "w.pth.tar"),
                     methods=("none", "imagepiece"), dataset="synthetic", data_length=16, workers=0,
                     model_kwargs=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2))
    result = evaluate_plans(cfg)
    assert [r["method"] for r in result["results"]] == ["none", "imagepiece"]
    assert result["results"][1]["images"] == 16


def test_cli_eval_table_and_json(run_dir, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "--checkpoint", run_dir, "--method", "none", "--method", "evit",
                                   "--json", str(out), *DATA])
    assert res.exit_code == 0, res.output
    assert "top-1" in res.output and "evit" in res.output
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["results"]] == ["none", "evit"]
    res = CliRunner().invoke(app, ["eval", "--method", "none", *DATA])
    assert res.exit_code == 2 and "no model given" in res.output


def test_torchrun_eval_matches_one_process(run_dir, tmp_path):
    single = evaluate_plans(EvalConfig(checkpoint=run_dir, methods=("none", "evit"), dataset="synthetic",
                                       data_length=40, workers=0, batch_size=8))
    out = tmp_path / "d.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
           "-m", "imagepiece.cli", "eval", "--checkpoint", run_dir, "--method", "none", "--method", "evit",
           "-b", "8", "--json", str(out), *DATA]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dist = json.loads(out.read_text())
    assert dist["world_size"] == 2 and dist["images"] == 40
    for a, b in zip(single["results"], dist["results"], strict=True):
        assert a["top1"] == b["top1"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_speed_column_is_warmed_up_and_interleaved(run_dir, monkeypatch):
    import imagepiece.measure as B

    calls = []
    real = B.time_interleaved

    def spy(fns, x, warmup, runs, *args, **kwargs):
        calls.append((list(fns), warmup, runs))
        return real(fns, x, warmup, runs, *args, **kwargs)

    monkeypatch.setattr(B, "time_interleaved", spy)
    cfg = EvalConfig(checkpoint=run_dir, methods=("none", "evit", "tome:r=2"), dataset="synthetic",
                     data_length=16, workers=0, batch_size=8, timing_warmup=1, timing_runs=2)
    result = evaluate_plans(cfg)
    # one interleaved timing of every plan together, after warm-up rounds
    assert calls == [(["none", "evit", "tome:r=2"], 1, 2)]
    assert all(r["images_per_s"] > 0 for r in result["results"])
    assert result["results"][0]["speedup"] == 1.0


def test_json_has_no_nan(tmp_path):
    from imagepiece.evaluate import write_json

    write_json({"results": [{"images_per_s": float("nan"), "speedup": None}]}, str(tmp_path / "r.json"))
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["results"][0]["images_per_s"] is None


def test_evaluation_does_not_import_training():
    """evaluate <-> train was an import circle; distributed set-up now lives in its own module."""
    code = ("import sys; from imagepiece.evaluate import EvalConfig, evaluate_plans; "
            "evaluate_plans(EvalConfig(model='vit_tiny_patch16_224', model_kwargs=dict(patch_size=4, "
            "embed_dim=32, depth=2, num_heads=2), img_size=32, dataset='synthetic', data_length=4, "
            "workers=0, methods=('none', 'evit'))); assert 'imagepiece.train' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_shipped_table_fits_80_columns():
    """`imagepiece eval` with no options: one table line per model in an 80-column terminal,
    whatever the length of the plans' specs (listed under the table)."""
    import io

    from rich.console import Console

    from imagepiece.evaluate import render_shipped

    rows = [dict(model=m, method=spec, top1=90.123, top5=99.9, card_top1=90.1, gmacs=0.0226,
                 images_per_s=1715.2, speedup=1.0, reference="stem-baseline")
            for m, spec in [("stem-baseline", "none"),
                            ("stem-imagepiece", "imagepiece:merge_share=0.25,locality=0.1,budget=compound")]]
    result = dict(split="test", images=10000, source="Debian package dataset-fashion-mnist",
                  root="/usr/share/datasets/fashion-mnist", results=rows, device="cpu", threads=2,
                  batch=256)
    out = io.StringIO()
    render_shipped(result, Console(file=out, width=80))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert sum(line.startswith("│ ") for line in lines) == 2  # one line per model
    assert any("budget=compound" in line for line in lines)
    assert "over stem-baseline for stem-baseline, stem-imagepiece" in " ".join(out.getvalue().split())


# --------------------------------------------------------------------------------------
# Each model's own preprocessing, its class count, every family
# --------------------------------------------------------------------------------------

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SHIPPED = dict(model="shipped:baseline", methods=("none",), split="test",  # Fashion-MNIST by default
               max_images=300, workers=0, batch_size=100, timing_runs=0)


def test_eval_prepares_images_as_the_model_expects_and_forcing_others_changes_top1():
    """The shipped model was trained with Fashion-MNIST's mean/std (its card); ImageNet's,
    forced, lowers top-1: eval must not silently use ImageNet's."""
    own = evaluate_plans(EvalConfig(**SHIPPED))
    wrong = evaluate_plans(EvalConfig(**SHIPPED, **IMAGENET))
    assert "card of shipped:baseline" in own["preprocessing"] and "0.286" in own["preprocessing"]
    assert "overridden: mean, std" in wrong["preprocessing"]
    assert own["results"][0]["top1"] > 80 and wrong["results"][0]["top1"] < own["results"][0]["top1"] - 5


def test_a_runs_weights_are_scored_on_the_data_it_was_trained_on(run_dir):
    from imagepiece.data import FASHION_MEAN
    from imagepiece.preprocess import from_run

    result = evaluate_plans(EvalConfig(checkpoint=run_dir, methods=("none",), dataset="synthetic",
                                       data_length=16, workers=0, timing_runs=0))
    assert "training run's data (synthetic)" in result["preprocessing"] and "0.485" in result["preprocessing"]
    prep = from_run({"img_size": 28, "config": {"dataset": "fashion-mnist", "crop_pct": None}})
    assert (prep.mean, prep.crop_pct, prep.img_size, prep.interpolation) == (FASHION_MEAN, 1.0, 28, "bicubic")


def test_weights_exported_from_a_run_keep_its_preprocessing(run_dir, tmp_path):
    """A weights file saved with its run's meta (and a checkpoint folder's model.safetensors) is
    scored on the run's data transform; a bare file falls back to the architecture's
    pretrained_cfg, and says so."""
    import os

    from imagepiece.checkpoint import load_state_dict, run_meta, run_weights_metadata, save_weights

    best = os.path.join(run_dir, "checkpoints", "best")
    meta = run_meta(best)
    tagged = save_weights(str(tmp_path / "tagged.safetensors"), load_state_dict(best),
                          metadata=run_weights_metadata(meta))
    bare = save_weights(str(tmp_path / "bare.safetensors"), load_state_dict(best))
    assert run_meta(tagged) == meta and run_meta(os.path.join(best, "model.safetensors")) == meta
    assert run_meta(bare) == {}
    common = dict(methods=("none",), dataset="synthetic", data_length=16, workers=0, timing_runs=0,
                  model="vit_tiny_patch16_224", img_size=32,
                  model_kwargs=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2))
    own = evaluate_plans(EvalConfig(checkpoint=tagged, **common))
    guessed = evaluate_plans(EvalConfig(checkpoint=bare, **common))
    assert "training run's data (synthetic)" in own["preprocessing"] and "0.485" in own["preprocessing"]
    assert "pretrained_cfg" in guessed["preprocessing"] and "0.485" not in guessed["preprocessing"]


def _image_folder(root, classes, size=20):
    from PIL import Image

    for c in classes:
        (root / "val" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (size, size), (40 * i, 90, 200)).save(root / "val" / c / f"{i}.png")
    return str(root)


def test_a_model_whose_classes_are_not_the_datas_is_refused(tmp_path):
    data = _image_folder(tmp_path, ["cat", "dog"])
    with pytest.raises(EvalError, match="the model has 10 classes but imagefolder/val has 2"):
        evaluate_plans(EvalConfig(**{**SHIPPED, "dataset": "imagefolder", "split": "val"}, data_root=data))


def test_transformers_folders_size_from_the_model_and_no_head_refused(tmp_path):
    T = pytest.importorskip("transformers")
    dim = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
               intermediate_size=64)
    T.ViTForImageClassification(T.ViTConfig(**dim, num_labels=2)).save_pretrained(tmp_path / "vit")
    T.CLIPVisionModel(T.CLIPVisionConfig(**dim)).save_pretrained(tmp_path / "clip")
    data = _image_folder(tmp_path / "data", ["cat", "dog"])
    cfg = dict(methods=("none", "tome:r=1"), dataset="imagefolder", data_root=data, workers=0,
               timing_runs=0)
    result = evaluate_plans(EvalConfig(model=str(tmp_path / "vit"), **cfg))  # no --img-size: the model's
    assert result["img_size"] == 32 and result["images"] == 4
    assert "no preprocessor_config" in result["preprocessing"]
    with pytest.raises(EvalError, match="CLIPVisionModel gives no class scores"):
        evaluate_plans(EvalConfig(model=str(tmp_path / "clip"), **cfg))
    with pytest.raises(EvalError, match="--img-size 48 does not match"):
        evaluate_plans(EvalConfig(model=str(tmp_path / "vit"), img_size=48, **cfg))


def test_cli_eval_plans_alone_score_the_shipped_baseline_and_write_csv(tmp_path):
    import csv

    out = tmp_path / "r.csv"
    res = CliRunner().invoke(app, ["eval", "--method", "none", "--method", "tome:r=2", "--max-images", "64",
                                   "--workers", "0", "--csv", str(out)])
    assert res.exit_code == 0, res.output
    assert "shipped model 'baseline'" in res.output and "preprocessing" in res.output
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["none", "tome:r=2"]
    assert rows[0]["split"] == "test" and 80 < float(rows[0]["top1"]) <= 100 and rows[0]["images"] == "64"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_mps_is_a_known_device_refused_where_absent():
    res = CliRunner().invoke(app, ["eval", "--device", "mps", "--method", "none"])
    assert res.exit_code == 2 and "has no MPS device" in res.output and "Traceback" not in res.output
