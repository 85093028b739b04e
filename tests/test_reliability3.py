"""Issue 22, round 3 (items 1, 2, 7, 8, 11, 12, 13, 15, 17 and parts of 19) and issue 23 item 6:
data kept, wrong results refused, one-line errors instead of tracebacks."""

import json
import os
import shutil
from types import SimpleNamespace

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


# -- a finished 2-class run, shared by the run-folder and checkpoint cases ----------------------

@pytest.fixture(scope="module")
def done(tmp_path_factory):
    from imagepiece.train import resolve_config, train

    root = tmp_path_factory.mktemp("rel3")
    before = torch.get_num_threads()
    run = train(resolve_config(overrides=dict(TINY, epochs=2, num_classes=2, output=str(root / "runs"),
                                              name="done")))["run_dir"]
    torch.set_num_threads(before)
    return root, run


def copy_run(done, name):
    root, run = done
    target = root / "runs" / name
    shutil.copytree(run, target)
    return target


def train_args(out, name, *extra):
    return ["train", *ARCH, "--dataset", "synthetic", "--img-size", "32", "--set", "data_length=32",
            "--set", "aa=null", "--epochs", "1", "-b", "16", "--workers", "0", "--threads", "1",
            "-o", out, "--name", name, *extra]


# -- item 1: --overwrite replaces only a run folder ---------------------------------------------

@pytest.mark.parametrize("contents", [("run_a/config.yaml", "run_b/log.jsonl"),
                                      ("notes.txt", "photos/p.png")])
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, contents):
    for rel in contents:
        (tmp_path / "out" / "N" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / "N" / rel).write_text("mine")
    before = listing(tmp_path)
    res = invoke(train_args(tmp_path / "out", "N", "--overwrite"))
    assert_one_line_error(res, "replaces only a run folder")
    assert listing(tmp_path) == before


def test_overwrite_still_replaces_a_run(done, tmp_path):
    copy_run(done, "again")
    res = invoke(train_args(done[0] / "runs", "again", "--overwrite", "--epochs", "1"))
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in open(done[0] / "runs" / "again" / "log.jsonl")]
    assert [r["epoch"] for r in rows] == [0]


# -- items 2 and 17: --resume keeps log lines it did not write, even undecodable ones -------------

def test_resume_keeps_lines_it_did_not_write(done):
    run = copy_run(done, "notes")
    log = run / "log.jsonl"
    ours = log.read_bytes().splitlines(keepends=True)
    foreign = [b"# a comment\n", b'{"note": "lr looked high"}\n', b"\xff\xfe not utf-8\n"]
    log.write_bytes(ours[0] + foreign[0] + foreign[1] + ours[1] + foreign[2])
    res = invoke(["train", "--resume", run, "--epochs", "3"])
    assert res.exit_code == 0, res.output
    lines = log.read_bytes().splitlines(keepends=True)
    assert lines[:5] == [ours[0], foreign[0], foreign[1], ours[1], foreign[2]]
    assert len(lines) == 6 and json.loads(lines[5])["epoch"] == 2


# -- item 7: resuming a finished run; fewer epochs than done ----------------------------------

def test_resume_of_a_finished_run_reports_its_best(done):
    run = copy_run(done, "finished")
    res = invoke(["train", "--resume", run])
    assert res.exit_code == 0, res.output
    assert "nan" not in res.output and "best val top-1" in res.output


def test_resume_with_fewer_epochs_than_done_is_refused_and_changes_nothing(done):
    run = copy_run(done, "fewer")
    before = (run / "config.yaml").read_text()
    res = invoke(["train", "--resume", run, "--epochs", "1"])
    assert_one_line_error(res, "epochs=1 is fewer than the 2 epochs")
    assert (run / "config.yaml").read_text() == before


# -- item 8: checksums ----------------------------------------------------------------------------

def flip(path, count=2000):
    data = bytearray(open(path, "rb").read())
    step = max(1, (len(data) // 2) // count)
    for i in range(len(data) // 4, len(data) // 4 + count * step, step):
        data[i % len(data)] ^= 0x5A
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_flipped_bytes_in_a_checkpoint_are_refused_on_resume(done, name):
    run = copy_run(done, f"flip-{name}")
    flip(run / "checkpoints" / "last" / name)
    res = invoke(["train", "--resume", run, "--epochs", "3"])
    assert_one_line_error(res, name)
    assert "sha256" in res.output or "CRC" in res.output


def test_flipped_bytes_are_refused_by_eval_and_finetune(done, tmp_path):
    run = copy_run(done, "flip-eval")
    flip(run / "checkpoints" / "best" / "model.safetensors")
    res = invoke(["eval", "--checkpoint", run, "--method", "none", "--workers", "0",
                  "--data-length", "4"])
    assert_one_line_error(res, "does not match the sha256")
    res = invoke(train_args(tmp_path, "ft", "--finetune", run, "--set", "num_classes=2"))
    assert_one_line_error(res, "does not match the sha256")
    assert not os.path.exists(tmp_path / "ft")


def test_checkpoints_without_a_checksum_still_load(done):
    from imagepiece.checkpoint import load_checkpoint, load_state_dict
    from imagepiece.zoo import load_shipped, shipped_models

    run = copy_run(done, "old")
    meta_path = run / "checkpoints" / "last" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert set(meta.pop("sha256")) == {"model.safetensors", "state.pt"}
    meta_path.write_text(json.dumps(meta))
    assert load_checkpoint(str(run / "checkpoints" / "last")).state["rng"]
    for name in shipped_models():
        assert load_shipped(name) is not None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    weights = os.path.join(here, "results", "fashion_mnist", "cpu", "weights")
    if os.path.isdir(weights):
        first = sorted(os.listdir(weights))[0]
        assert load_state_dict(os.path.join(weights, first))


def test_corrupt_pth_names_the_file(tmp_path):
    from imagepiece.checkpoint import CheckpointError, load_state_dict

    path = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, path)
    assert set(load_state_dict(str(path))) == {"w"}
    flip(path, 500)
    with pytest.raises(CheckpointError, match="foreign.pth"):
        load_state_dict(str(path))


# -- item 11: an image size the model was not built for -------------------------------------------

@pytest.mark.parametrize("how", ["cli", "yaml"])
def test_train_img_size_the_model_was_not_built_for(tmp_path, how):
    if how == "cli":
        args = train_args(tmp_path / "out", "s", "--model-arg", "img_size=32")
        args[args.index("--img-size") + 1] = "33"
    else:
        (tmp_path / "c.yaml").write_text("img_size: 48\n")
        args = train_args(tmp_path / "out", "s", "--model-arg", "img_size=32",
                          "--config", tmp_path / "c.yaml")
        i = args.index("--img-size")
        del args[i:i + 2]
    res = invoke(args)
    assert_one_line_error(res, "does not match the input size 32x32")
    assert not os.path.exists(tmp_path / "out")


# -- item 12: eval of a 2-class run on 10-class data ----------------------------------------------

def test_eval_names_the_class_counts(done):
    res = invoke(["eval", "--checkpoint", done[1], "--dataset", "fashion-mnist", "--split", "test",
                  "--method", "none", "--workers", "0", "--max-images", "8"])
    assert_one_line_error(res, "the model has 2 classes but fashion-mnist/test has 10")


# -- item 15: a lost torchrun peer --------------------------------------------------------------

def test_lost_peer_is_one_line_naming_it(monkeypatch):
    from imagepiece.distributed import DistInfo, LostPeerError, lost_peer

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                        "[127.0.0.1]:40000: Connection reset by peer [127.0.0.1]:29511")
    two = DistInfo(0, 2, 0, torch.device("cpu"))
    lost = lost_peer(gloo, two)
    assert isinstance(lost, LostPeerError)
    assert "127.0.0.1:29511" in str(lost) and "Connection reset by peer" in str(lost)
    assert "\n" not in str(lost)
    assert lost_peer(gloo, DistInfo(0, 1, 0, torch.device("cpu"))) is None  # one process: no peer
    assert lost_peer(RuntimeError("CUDA out of memory"), two) is None

    def killed(*a, **k):
        raise lost

    monkeypatch.setattr("imagepiece.train.train", killed)
    res = invoke(["train", "--dataset", "synthetic", "--name", "x"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert res.output.strip().splitlines() == [f"error: {lost}"]


def test_train_translates_a_lost_peer(monkeypatch, tmp_path):
    from imagepiece.distributed import DistInfo, LostPeerError
    from imagepiece.train import loop, resolve_config

    def gone(run):
        raise RuntimeError("Connection closed by peer [10.0.0.2]:1234")

    # a two-process run up to its first collective, without a process group
    monkeypatch.setattr(loop, "setup_distributed", lambda device: DistInfo(0, 2, 0, torch.device("cpu")))
    monkeypatch.setattr(loop, "build_run", lambda cfg, info, console: SimpleNamespace(run_dir=""))
    monkeypatch.setattr(loop, "claimed", _fake_claimed)
    monkeypatch.setattr(loop, "_open_log", lambda run, resume: None)
    monkeypatch.setattr(loop, "_fit", gone)
    with pytest.raises(LostPeerError, match="10.0.0.2:1234"):
        loop.train(resolve_config(overrides=dict(TINY, epochs=1, output=str(tmp_path), name="p")))


class _fake_claimed:
    """The run folder without the process group (the collectives of a real run are not here)."""

    def __init__(self, cfg, info, resume, overwrite):
        self.path = os.path.join(cfg.output, cfg.name)

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        return False


# -- item 17: hints and messages that help --------------------------------------------------------

def test_misfit_with_missing_blocks_gets_no_classifier_only_hint(tmp_path):
    from imagepiece.checkpoint import CheckpointError, load_weights, save_weights

    def vit(depth, classes):
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=depth,
                                 num_heads=2, num_classes=classes)

    save_weights(str(tmp_path / "head.safetensors"), vit(2, 5).state_dict())
    with pytest.raises(CheckpointError, match="only the classifier differs"):
        load_weights(vit(2, 10), str(tmp_path / "head.safetensors"))
    save_weights(str(tmp_path / "shallow.safetensors"), vit(1, 5).state_dict())
    with pytest.raises(CheckpointError) as info:
        load_weights(vit(2, 10), str(tmp_path / "shallow.safetensors"))
    assert "blocks.1.*" in str(info.value) and "only the classifier" not in str(info.value)


def test_run_with_only_best_left_is_not_told_to_overwrite(done):
    run = copy_run(done, "best-only")
    shutil.rmtree(run / "checkpoints" / "last")
    res = invoke(["train", "--resume", run])
    assert_one_line_error(res, "--finetune")
    assert "--overwrite" not in res.output


def test_corrupt_image_under_strict_data_leaves_no_run_folder(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = tmp_path / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "2.png").write_bytes(b"not an image")
    args = train_args(tmp_path / "out", "strict", "--set", "strict_data=true", "-b", "2")
    args[args.index("synthetic")] = "imagefolder"
    args += ["--data", tmp_path / "data", "--set", "mixup=0", "--set", "cutmix=0"]
    res = invoke(args)
    assert_one_line_error(res, "2.png")
    assert not os.path.exists(tmp_path / "out" / "strict")


# -- item 4: a split is the folder the header names -------------------------------------------

def _class_tree(root, splits):
    for split in splits:
        for c in ("a", "b"):
            folder = root / split / c if split else root / c
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (60 * i, 30, 0)).save(folder / f"{i}.png")
    return root


def test_train_refuses_training_and_validating_on_one_folder(tmp_path):
    data = _class_tree(tmp_path / "data", [None])  # a class tree, no train/ or val/
    args = train_args(tmp_path / "out", "same", "-b", "2")
    args[args.index("synthetic")] = "imagefolder"
    res = invoke(args + ["--data", data, "--set", "mixup=0", "--set", "cutmix=0"])
    assert_one_line_error(res, "train and val would both read")
    assert not os.path.exists(tmp_path / "out" / "same")


def test_eval_split_is_the_folder_it_names(tmp_path):
    data = _class_tree(tmp_path / "data", ["train", "val"])
    common = ["eval", *ARCH, "--img-size", "32", "--num-classes", "2", "--method", "none", "--workers", "0",
              "--dataset", "imagefolder"]
    res = invoke([*common, "--data", data, "--split", "test"])
    assert_one_line_error(res, "no 'test' split")  # not val/ under the name "test"
    out = tmp_path / "r.json"
    res = invoke([*common, "--data", data / "train", "--split", "val", "--json", out])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["folder"] == str(data / "train")  # says which images it read
    assert f"(folder{data / 'train'})" in "".join(res.output.split())  # rich wraps the title
