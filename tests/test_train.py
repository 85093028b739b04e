"""Training: the recipe learns, resumes exactly, runs under torchrun, and rejects bad options."""

import fcntl
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import read_log
from imagepiece.cli import app
from imagepiece.plan import keep_rate_warmup
from imagepiece.train import ConfigError, parse_set, resolve_config, resume_config, train

TINY = dict(model="vit_tiny_patch16_224",
            model_kwargs=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2),
            dataset="synthetic", img_size=32, workers=0, threads=1, progress=False)
# Everything random in the recipe on: RandAugment, random erasing, Mixup/CutMix, drop path,
# EMA and the EViT keep-rate warm-up, so an exact resume has every RNG to restore.
FULL = dict(TINY, data_length=64, batch_size=16, epochs=3, warmup_epochs=1, method="evit",
            ema=True, ema_decay=0.9, shrink_start=0, shrink_epochs=2)


@pytest.fixture(autouse=True)
def _one_thread():
    # Deterministic and fast on a shared 2-core machine; restored for the other test files.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def weights(run_dir, name="model"):
    return load_file(os.path.join(run_dir, "checkpoints", "last", f"{name}.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_short_training_lowers_the_loss(tmp_path):
    cfg = resolve_config(overrides=dict(
        TINY, data_length=256, batch_size=16, epochs=5, lr=5e-3, warmup_epochs=0, aa=None, reprob=0,
        mixup=0, cutmix=0, smoothing=0, drop_path=0, scale=[0.9, 1.0], hflip=0,
        output=str(tmp_path), name="learn"))
    summary = train(cfg)
    rows = read_log(summary["run_dir"])
    assert len(rows) == 5 and summary["epochs_done"] == 5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.4
    assert rows[-1]["val_top1"] > 35  # chance is 10
    assert os.path.isfile(os.path.join(summary["run_dir"], "checkpoints", "best", "model.safetensors"))


def test_resume_is_exact(tmp_path):
    full = train(resolve_config(overrides=dict(FULL, output=str(tmp_path), name="full")))
    # 4 steps per epoch: killed in the middle of the second epoch
    cut = train(resolve_config(overrides=dict(FULL, output=str(tmp_path), name="cut", stop_after_steps=6)))
    assert cut["stopped"] and cut["epochs_done"] == 1
    run = cut["run_dir"]
    resumed = train(resume_config(run), resume=run)
    assert resumed["epochs_done"] == 3 and not resumed["stopped"]
    assert_same_weights(weights(full["run_dir"]), weights(run))
    assert_same_weights(weights(full["run_dir"], "ema"), weights(run, "ema"))
    assert read_log(full["run_dir"]) == read_log(run)


def test_keep_rate_warmup_is_logged_per_iteration_schedule(tmp_path):
    summary = train(resolve_config(overrides=dict(FULL, ema=False, output=str(tmp_path), name="k")))
    rows = read_log(summary["run_dir"])
    # the last keep rate used in each epoch is the schedule at its last step
    expected = [keep_rate_warmup(r["step"] - 1, 4, 0.7, 0, 2) for r in rows]
    assert [r["keep_rate"] for r in rows] == pytest.approx(expected)
    assert rows[0]["keep_rate"] > 0.7 and rows[-1]["keep_rate"] == 0.7


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nbatch-size: 8\nmixup: 0\nscale: [0.5, 1.0]\n")
    cfg = resolve_config(str(path), {"epochs": 9})
    assert (cfg.epochs, cfg.batch_size, cfg.mixup, cfg.scale) == (9, 8, 0, [0.5, 1.0])
    assert parse_set(["aa=null", "min-lr=1e-6"]) == {"aa": None, "min_lr": "1e-6"}
    assert resolve_config(overrides=parse_set(["min-lr=1e-6"])).min_lr == 1e-6
    with pytest.raises(ConfigError, match="lr=.fast. is not a number"):
        resolve_config(overrides={"lr": "fast"})
    with pytest.raises(ConfigError, match="unknown training option.*'epoch'"):
        resolve_config(overrides={"epoch": 3})
    with pytest.raises(ConfigError, match="batch_size=7 must be even"):
        resolve_config(overrides={"batch_size": 7})
    with pytest.raises(ConfigError, match="keep_rate=1.5"):
        resolve_config(overrides={"keep_rate": 1.5})
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_set(["epochs"])
    with pytest.raises(ConfigError, match="no config.yaml"):
        resume_config(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown model"):
        train(resolve_config(overrides=dict(TINY, model="vit_nope", output=str(tmp_path))))
    with pytest.raises(ConfigError, match="method 'tome'"):
        train(resolve_config(overrides=dict(TINY, method="tome", keep_rate=0.5, output=str(tmp_path))))


def test_cli_train_config_set_and_resume(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: vit_tiny_patch16_224\nmodel_kwargs: {patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}\n"
        "dataset: synthetic\nworkers: 0\nthreads: 1\nepochs: 2\nbatch_size: 16\n")
    runner = CliRunner()
    args = ["train", "--config", str(tmp_path / "c.yaml"), "--set", "data_length=32",
            "--method", "imagepiece", "-o", str(tmp_path), "--name", "cli"]
    res = runner.invoke(app, args + ["--stop-after-steps", "3"])
    assert res.exit_code == 0, res.output
    assert "continue with --resume" in res.output
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert len(read_log(tmp_path / "cli")) == 2
    saved = (tmp_path / "cli" / "config.yaml").read_text()
    assert "method: imagepiece" in saved and "data_length: 32" in saved
    res = runner.invoke(app, ["train", "--set", "epochs=0", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "epochs=0 is not allowed; expected a value >= 1" in res.output


TORCHRUN_ARGS = ["--model", "vit_tiny_patch16_224", "--model-arg", "patch_size=4", "--model-arg",
                 "embed_dim=32", "--model-arg", "depth=2", "--model-arg", "num_heads=2", "--dataset",
                 "synthetic", "--set", "data_length=64", "--epochs", "2", "-b", "8", "--workers", "0",
                 "--method", "evit", "--shrink-start", "0", "--shrink-epochs", "1"]


def torchrun(args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "imagepiece.cli", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_torchrun_two_processes_and_exact_resume(tmp_path):
    torchrun(TORCHRUN_ARGS + ["-o", str(tmp_path), "--name", "full"], 29611)
    rows = read_log(tmp_path / "full")
    assert [r["step"] for r in rows] == [4, 8]  # 64 images / (8 x 2 processes) per epoch
    out = torchrun(TORCHRUN_ARGS + ["-o", str(tmp_path), "--name", "cut", "--stop-after-steps", "6"], 29612)
    assert out.stdout.count("continue with --resume") == 1  # only the main process prints
    torchrun(["--resume", str(tmp_path / "cut")], 29613)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert read_log(tmp_path / "full") == read_log(tmp_path / "cut")


def test_finetune_from_run_under_imagepiece_model(tmp_path):
    base = train(resolve_config(overrides=dict(TINY, data_length=32, batch_size=16, epochs=1,
                                               output=str(tmp_path), name="base")))
    # the same DeiT weights in an imagepiece_* model: its coherence branch starts at zero
    cfg = resolve_config(overrides=dict(
        TINY, model="imagepiece_deit_tiny_patch16_224", data_length=32, batch_size=16, epochs=2,
        method="imagepiece", keep_rate=0.5, finetune=base["run_dir"], output=str(tmp_path), name="ft"))
    with pytest.warns(UserWarning, match="keep their initialisation"):
        summary = train(cfg)
    rows = read_log(summary["run_dir"])
    assert [r["keep_rate"] for r in rows] == [pytest.approx(keep_rate_warmup(1, 2, 0.5, 0, 1)), 0.5]
    w = weights(summary["run_dir"])
    added = set(w) - set(weights(base["run_dir"]))
    assert added and all(".branch." in k for k in added)


def test_run_folder_is_never_silently_reused(tmp_path, monkeypatch):
    cfg = resolve_config(overrides=dict(TINY, data_length=32, batch_size=16, epochs=1, output=str(tmp_path),
                                        name="same"))
    train(cfg)
    run = tmp_path / "same"
    first = {p: (run / p).read_bytes() for p in ("log.jsonl", "config.yaml")}
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        train(cfg)
    assert {p: (run / p).read_bytes() for p in first} == first  # untouched
    train(cfg, overwrite=True)  # replaced as a whole: one epoch in the log, not two
    assert [r["epoch"] for r in read_log(run)] == [0]
    # a folder locked by a running process is refused, even to --resume
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="in use by another training process"):
            train(resume_config(str(run), {"epochs": 2}), resume=str(run))
    assert [r["epoch"] for r in read_log(run)] == [0]
    # without a name, a folder taken in the same second gets a new name
    monkeypatch.setattr("imagepiece.train.run_folder.time.strftime", lambda fmt: "20250101-000000")
    unnamed = dict(TINY, data_length=32, batch_size=16, epochs=1, output=str(tmp_path / "auto"))
    a = train(resolve_config(overrides=unnamed))["run_dir"]
    b = train(resolve_config(overrides=unnamed))["run_dir"]
    assert b == a + "-2" and len(read_log(a)) == len(read_log(b)) == 1


def test_finetune_to_new_classes_needs_the_opt_in(tmp_path):
    base = train(resolve_config(overrides=dict(TINY, data_length=32, batch_size=16, epochs=1,
                                               output=str(tmp_path), name="base")))["run_dir"]
    ft = dict(TINY, data_length=32, batch_size=16, epochs=1, num_classes=4, finetune=base,
              output=str(tmp_path))
    with pytest.raises(ValueError, match="(?s)head.weight.*finetune_new_head=true"):
        train(resolve_config(overrides=dict(ft, name="ft")))
    assert not (tmp_path / "ft").exists()  # refused before the run folder was made
    with pytest.warns(UserWarning, match="head"):
        train(resolve_config(overrides=dict(ft, name="ft", finetune_new_head=True)))
