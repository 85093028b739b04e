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
                 images_per_s=1715.2, speedup=1.0)
            for m, spec in [("baseline", "none"),
                            ("imagepiece", "imagepiece:merge_share=0.25,locality=0.1,budget=compound")]]
    result = dict(split="test", images=10000, source="Debian package dataset-fashion-mnist",
                  root="/usr/share/datasets/fashion-mnist", results=rows, device="cpu", threads=2,
                  batch=256)
    out = io.StringIO()
    render_shipped(result, Console(file=out, width=80))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert sum(line.startswith("│ ") for line in lines) == 2  # one line per model
    assert any("budget=compound" in line for line in lines)
