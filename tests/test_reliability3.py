"""Issue 22, round 3 (items 1, 2, 7, 8, 11, 12, 13, 15, 17 and parts of 19) and issue 23 item 6:
data kept, wrong results refused, one-line errors instead of tracebacks."""

import json
import os
import shutil

import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from imagepiece.cli import app

ARCH = ["--model", "vit_tiny_patch16_224", "--model-arg", "patch_size=4", "--model-arg", "embed_dim=32",
        "--model-arg", "num_heads=2", "--model-arg", "depth=2"]
TINY = dict(model="vit_tiny_patch16_224", model_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2),
            dataset="synthetic", img_size=32, data_length=32, batch_size=16, workers=0, threads=1,
            progress=False, warmup_epochs=0, aa=None)


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def invoke(args, cwd=None):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


def assert_one_line_error(res, expected):
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert expected in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 3, res.output


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root)
                  for n in dirs + files)


def image(path):
    Image.new("RGB", (40, 40), "red").save(path)
    return str(path)


# -- item 13: --model-arg with a broken YAML value ------------------------------------------

@pytest.mark.parametrize("command", [
    ["train", "--dataset", "synthetic", "-o", "{t}/runs"],
    ["eval", "--dataset", "synthetic", "--method", "none"],
    ["visualize", "{t}/a.png", "--model", "vit_tiny_patch16_224", "--out", "{t}/vis"],
    ["analyze", "--out", "{t}/an", "--model-arg", "x=[1", "masking"],
])
def test_model_arg_that_is_not_yaml_is_one_line(tmp_path, command):
    image(tmp_path / "a.png")
    args = [a.replace("{t}", str(tmp_path)) for a in command]
    if args[0] != "analyze":
        args += ["--model-arg", "x=[1"]
    before = listing(tmp_path)
    res = invoke(args)
    assert_one_line_error(res, "'[1' is not a YAML value")
    assert listing(tmp_path) == before


# -- item 7 (visualize) and item 17 (a folder given as an image) -------------------------------

@pytest.mark.parametrize("images,out,expected", [
    (2, "x.png", "2 images give a folder"),
    (1, "x.jpg", "figures are written as .png"),
])
def test_visualize_out_file_name_is_not_made_a_folder(tmp_path, images, out, expected):
    paths = [image(tmp_path / f"i{i}.png") for i in range(images)]
    res = invoke(["visualize", *paths, *ARCH, "--model-arg", "img_size=32", "--out", tmp_path / out])
    assert_one_line_error(res, expected)
    assert not os.path.exists(tmp_path / out)


def test_visualize_folder_given_as_image_is_named_a_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    res = invoke(["visualize", tmp_path / "pics", *ARCH, "--model-arg", "img_size=32",
                  "--out", tmp_path / "v"])
    assert_one_line_error(res, "is a folder")
    assert not os.path.exists(tmp_path / "v")


# -- issue 23 item 6: the posterize shim stays inside our transform ----------------------------

@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "original", "augmix-m5-w4-d2"])
def test_train_transform_leaves_timms_global_table_alone(aa):
    from timm.data import auto_augment

    from imagepiece.data import TransformConfig, _augment_ops, build_transform

    before = dict(auto_augment.NAME_TO_OP)
    transform = build_transform(32, True, TransformConfig(auto_augment=aa))
    assert auto_augment.NAME_TO_OP == before
    posterize = [op for op in _augment_ops(transform) if op.name.startswith("Posterize")]
    assert posterize
    black = posterize[0].aug_fn(Image.new("RGB", (4, 4), "white"), 0)  # 0 bits: black, not an error
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))


# -- item 19: the house -------------------------------------------------------------------------

def test_train_package_keeps_its_public_names_and_dead_code_is_gone():
    from imagepiece import train as T
    from imagepiece.plan import Step

    for name in ("ConfigError", "TrainConfig", "create_model", "parse_set", "resolve_config",
                 "resume_config", "setup_distributed", "train", "DistInfo", "FIXED_ON_RESUME"):
        assert hasattr(T, name), name
    assert callable(T.train) and not hasattr(Step, "needs_metric")
