"""A training process killed inside each checkpoint save and between the saves and the log line
resumes to the run an uninterrupted process makes: the same last, EMA and best weights, the same
best epoch, every log line (issue 14, item 8)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_log
from imagepiece.train import resolve_config, resume_config, train

CONFIG = dict(model="vit_tiny_patch16_224",
              model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2),
              dataset="synthetic", img_size=32, data_length=32, batch_size=16, epochs=3, warmup_epochs=0,
              lr=2e-3, aa=None, ema=True, ema_decay=0.9, workers=0, threads=1, progress=False)
# IMAGEPIECE_KILL_AT values: the second time each point is reached (epoch 1 or later, so a
# checkpoint to resume from exists); "save:best:*" needs a second best epoch, checked below.
POINTS = ["save:best:weights@2", "save:best:renames@2", "train:after-best@2", "save:last:weights@2",
          "save:last:renames@2", "train:after-last@2"]


def run_config(out, name):
    return dict(CONFIG, output=str(out), name=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run, and one killed process per point (started together)."""
    out = tmp_path_factory.mktemp("crash")
    before = torch.get_num_threads()
    reference = train(resolve_config(overrides=run_config(out, "reference")))
    torch.set_num_threads(before)
    procs = {}
    for i, point in enumerate(POINTS):
        code = ("import json, sys; from imagepiece.train import resolve_config, train; "
                "train(resolve_config(overrides=json.loads(sys.argv[1])))")
        env = dict(os.environ, IMAGEPIECE_KILL_AT=point, OMP_NUM_THREADS="1")
        procs[point] = subprocess.Popen([sys.executable, "-c", code, json.dumps(run_config(out, f"k{i}"))],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = {}
    for i, (point, proc) in enumerate(procs.items()):
        _, err = proc.communicate(timeout=240)
        killed[point] = (proc.returncode, err, str(out / f"k{i}"))
    return reference, killed


def assert_same_files(a, b, name):
    wa, wb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (name, k)


@pytest.mark.parametrize("point", POINTS)
def test_killed_run_resumes_bit_identical(runs, point):
    reference, killed = runs
    returncode, err, run_dir = killed[point]
    assert returncode == -9, f"not killed at {point}: {err[-2000:]}"
    ref_dir = reference["run_dir"]
    with open(os.path.join(ref_dir, "checkpoints", "best", "meta.json")) as f:
        assert json.load(f)["epoch"] >= 2  # a second best save happened: the best points were reached
    before = torch.get_num_threads()
    resumed = train(resume_config(run_dir), resume=run_dir)
    torch.set_num_threads(before)
    assert resumed["epochs_done"] == 3
    for ckpt in ("last", "best"):
        for name in ("model.safetensors", "ema.safetensors"):
            assert_same_files(os.path.join(ref_dir, "checkpoints", ckpt),
                              os.path.join(run_dir, "checkpoints", ckpt), name)
        with open(os.path.join(ref_dir, "checkpoints", ckpt, "meta.json")) as f:
            ref_meta = json.load(f)
        with open(os.path.join(run_dir, "checkpoints", ckpt, "meta.json")) as f:
            meta = json.load(f)
        assert (meta["epoch"], meta["best_epoch"], meta["best_top1"]) == \
            (ref_meta["epoch"], ref_meta["best_epoch"], ref_meta["best_top1"])
    assert read_log(run_dir) == read_log(ref_dir)
    # no temporary or aside folder of the killed save is left behind
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["best", "last"]
