"""Bad input to every command: exit code 2, one short message naming the value, no traceback,
nothing written (issue 14, items 4, 5, 7, 9, 10 and 11)."""

import os
import shutil
import tempfile

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from imagepiece.checkpoint import save_weights
from imagepiece.cli import app
from imagepiece.train import resolve_config, train

ARCH = ["--model", "vit_tiny_patch16_224", "--model-arg", "patch_size=4", "--model-arg", "embed_dim=32",
        "--model-arg", "num_heads=2"]
DEPTH4 = [*ARCH, "--model-arg", "depth=4"]
EVAL = ["eval", *DEPTH4, "--dataset", "synthetic", "--data-length", "8", "--workers", "0",
        "--method", "none", "--img-size", "32"]
TRAIN = ["train", *DEPTH4, "--dataset", "synthetic", "--set", "data_length=32", "--epochs", "1",
         "-b", "16", "--workers", "0", "--threads", "1", "--name", "r"]
ANALYZE = ["analyze", *DEPTH4, "--model-arg", "img_size=32", "--length", "4"]


def tiny(depth=4, embed_dim=32, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=embed_dim,
                             depth=depth, num_heads=2, num_classes=num_classes)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints, images, a finished run and damaged copies of it, shared by every case."""
    root = tmp_path_factory.mktemp("cli_errors")
    save_weights(str(root / "depth2.safetensors"), tiny(depth=2).state_dict())
    save_weights(str(root / "depth6.safetensors"), tiny(depth=6).state_dict())
    save_weights(str(root / "wide.safetensors"), tiny(embed_dim=64).state_dict())
    head = {k: v for k, v in tiny().state_dict().items() if k.startswith("head.")}
    save_file({k: v.contiguous() for k, v in head.items()}, str(root / "head_only.safetensors"))
    (root / "a").mkdir()
    (root / "b").mkdir()
    for folder in ("a", "b"):
        Image.new("RGB", (32, 32), "red").save(root / folder / "x.png")
    (root / "afile").write_text("not a folder")
    (root / "adir.json").mkdir()
    for name, text in {"maybe.yaml": "ema: maybe\n", "amp3.yaml": "amp: 3\n", "lrlist.yaml": "lr: [1, 2]\n",
                       "method7.yaml": "method: 7\n", "epochs.yaml": "epochs: 2.5\n"}.items():
        (root / name).write_text(text)
    before = torch.get_num_threads()
    run = train(resolve_config(overrides=dict(
        model="vit_tiny_patch16_224", model_kwargs=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2),
        dataset="synthetic", img_size=32, data_length=32, epochs=1, batch_size=16, workers=0, threads=1,
        progress=False, output=str(root / "runs"), name="done")))["run_dir"]
    torch.set_num_threads(before)
    damage = {
        "no_state": lambda d: os.remove(d / "checkpoints/last/state.pt"),
        "empty_state": lambda d: torch.save({}, d / "checkpoints/last/state.pt"),
        "empty_meta": lambda d: (d / "checkpoints/last/meta.json").write_text("{}"),
        "other_weights": lambda d: save_weights(str(d / "checkpoints/last/model.safetensors"),
                                                load_file(str(root / "depth2.safetensors"))),
        "broken_config": lambda d: (d / "config.yaml").write_text("model: [unclosed\n"),
    }
    for name, hurt in damage.items():
        shutil.copytree(run, root / "runs" / name)
        hurt(root / "runs" / name)
    return root


def snapshot(root):
    """Every file under ``root`` with its size and modification time."""
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


# (case id, arguments with {r} for the fixture folder, text the message must contain)
CASES = [
    # item 4: checkpoints of another architecture
    ("eval_depth2_ckpt", [*EVAL, "--checkpoint", "{r}/depth2.safetensors"], "blocks.2.*"),
    ("eval_depth6_ckpt", [*EVAL, "--checkpoint", "{r}/depth6.safetensors"], "unexpected: blocks.4.*"),
    ("eval_head_only_ckpt", [*EVAL, "--checkpoint", "{r}/head_only.safetensors"], "missing"),
    ("eval_wide_ckpt", [*EVAL, "--checkpoint", "{r}/wide.safetensors"], "of another shape"),
    ("train_finetune_wide", [*TRAIN, "-o", "{r}/out", "--finetune", "{r}/wide.safetensors"],
     "of another shape"),
    # item 5: values silently accepted or changed
    ("clip_grad_negative", [*TRAIN, "-o", "{r}/out", "--set", "clip_grad=-1"], "clip_grad=-1"),
    ("eval_device_tpu", [*EVAL, "--device", "tpu"], "'tpu'"),
    ("yaml_ema_maybe", [*TRAIN, "-o", "{r}/out", "--config", "{r}/maybe.yaml"], "ema='maybe'"),
    ("yaml_amp_3", [*TRAIN, "-o", "{r}/out", "--config", "{r}/amp3.yaml"], "amp=3"),
    ("method_bool_knob", [*TRAIN, "-o", "{r}/out", "--method", "tome:prop_attn=maybe"], "prop_attn='maybe'"),
    ("analyze_keep_rate_0", [*ANALYZE, "--out", "{r}/an", "attentiveness", "--keep-rate", "0"],
     "--keep-rate=0.0"),
    ("train_img_size_0", [*TRAIN, "-o", "{r}/out", "--img-size", "0"], "img_size=0"),
    ("train_threads_0", [*TRAIN, "-o", "{r}/out", "--threads", "0"], "threads=0"),
    ("train_num_classes_0", [*TRAIN, "-o", "{r}/out", "--set", "num_classes=0"], "num_classes=0"),
    ("eval_data_length_0", [*EVAL, "--data-length", "0"], "data_length=0"),
    ("eval_crop_pct_0", [*EVAL, "--crop-pct", "0"], "crop_pct=0"),
    ("eval_num_classes_0", [*EVAL, "--num-classes", "0"], "num_classes=0"),
    ("analyze_length_0", [*ANALYZE[:-2], "--length", "0", "--out", "{r}/an", "masking"], "--length=0"),
    ("analyze_mask_size_0", [*ANALYZE, "--out", "{r}/an", "masking", "--mask-size", "0"], "--mask-size=0"),
    ("reprob_3", [*TRAIN, "-o", "{r}/out", "--set", "reprob=3"], "reprob=3"),
    ("scale_reversed", [*TRAIN, "-o", "{r}/out", "--set", "scale=[1.0, 0.5]"], "scale=[1.0, 0.5]"),
    ("method_none_with_r", [*TRAIN, "-o", "{r}/out", "--method", "none", "--r", "4"], "r=4"),
    # item 7: a run folder in use is not reused
    ("train_name_in_use", [*TRAIN[:-2], "--name", "done", "-o", "{r}/runs"], "already holds a run"),
    # item 9: damaged run folders on --resume
    ("resume_no_state", ["train", "--resume", "{r}/runs/no_state"], "state.pt"),
    ("resume_empty_state", ["train", "--resume", "{r}/runs/empty_state"], "state.pt"),
    ("resume_empty_meta", ["train", "--resume", "{r}/runs/empty_meta"], "meta.json"),
    ("resume_other_weights", ["train", "--resume", "{r}/runs/other_weights"], "model.safetensors"),
    ("resume_broken_config", ["train", "--resume", "{r}/runs/broken_config"], "config.yaml"),
    ("resume_changed_model", ["train", "--resume", "{r}/runs/done", "--model-arg", "embed_dim=64"],
     "model_kwargs"),
    # item 10: output paths
    ("train_output_under_file", [*TRAIN, "-o", "{r}/afile/runs"], "is a file"),
    ("eval_json_is_dir", [*EVAL, "--json", "{r}/adir.json"], "is a directory"),
    ("eval_json_under_file", [*EVAL, "--json", "{r}/afile/r.json"], "is a file"),
    ("visualize_out_under_file", ["visualize", "{r}/a/x.png", *DEPTH4, "--model-arg", "img_size=32",
                                  "--out", "{r}/afile/v"], "is a file"),
    ("visualize_same_name", ["visualize", "{r}/a/x.png", "{r}/b/x.png", *DEPTH4, "--model-arg", "img_size=32",
                             "--out", "{r}/vis"], "would both be written"),
    ("analyze_out_is_file", [*ANALYZE, "--out", "{r}/afile", "masking"], "is a file"),
    # item 11: config values
    ("yaml_lr_list", [*TRAIN, "-o", "{r}/out", "--config", "{r}/lrlist.yaml"], "lr=[1, 2]"),
    ("yaml_method_int", [*TRAIN, "-o", "{r}/out", "--config", "{r}/method7.yaml"], "method=7"),
    ("yaml_epochs_fraction", ["train", "-o", "{r}/out", "--config", "{r}/epochs.yaml"], "epochs=2.5"),
    ("set_interpolation", [*TRAIN, "-o", "{r}/out", "--set", "interpolation=foo"], "interpolation='foo'"),
    ("eval_threads_negative", [*EVAL, "--threads", "-2"], "--threads=-2"),
    ("analyze_threads_negative", [*ANALYZE, "--threads", "-2", "--out", "{r}/an", "masking"],
     "--threads=-2"),
    ("eval_img_size_mismatch", [*EVAL[:-2], "--model-arg", "img_size=32", "--img-size", "48"],
     "--img-size 48"),
]


@pytest.mark.parametrize("args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(files, args, expected, monkeypatch):
    monkeypatch.chdir(files)
    threads = torch.get_num_threads()
    before = snapshot(files)
    res = CliRunner().invoke(app, [a.replace("{r}", str(files)) for a in args])
    torch.set_num_threads(threads)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # not an uncaught error
    assert "Traceback" not in res.output
    assert expected in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 5, res.output
    assert snapshot(files) == before, "files were written"


def test_read_only_output_folder_is_refused(monkeypatch):
    """Root writes anywhere a mode allows nobody to, so as root the command runs with the
    effective user id of ``nobody`` (the real id stays root, so it is restored afterwards)."""
    base = tempfile.mkdtemp(dir="/tmp")  # world-traversable parents, unlike pytest's tmp_path
    try:
        os.chmod(base, 0o755)
        ro = os.path.join(base, "ro")
        os.mkdir(ro, 0o555)
        os.chmod(ro, 0o555)
        monkeypatch.chdir(base)
        args = [*ANALYZE, "--out", os.path.join(ro, "an"), "masking"]
        root = os.geteuid() == 0
        if root:
            os.seteuid(65534)
        try:
            res = CliRunner().invoke(app, args)
        finally:
            if root:
                os.seteuid(0)
        assert res.exit_code == 2, res.output
        assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
        assert "is not writable" in res.output and ro in res.output
        assert os.listdir(ro) == []
    finally:
        shutil.rmtree(base)
