"""Checkpoints: our atomic directories, timm and official EViT/ToMe layouts, and bad files."""

import argparse
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from imagepiece.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_state_dict,
    load_weights,
    save_checkpoint,
    save_weights,
)


def tiny(num_classes=10, img_size=32, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, num_classes=num_classes)


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_checkpoint_round_trip(tmp_path):
    model, ema = tiny(seed=0), tiny(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": [{"torch": torch.get_rng_state()}]}
    path = save_checkpoint(tmp_path / "last", model, meta={"epoch": 3, "step": 30}, state=state, ema=ema)
    assert sorted(os.listdir(path)) == ["ema.safetensors", "meta.json", "model.safetensors", "state.pt"]
    ckpt = load_checkpoint(path)
    checksums = ckpt.meta.pop("sha256")  # of every file, checked when it is read back
    assert ckpt.meta == {"epoch": 3, "step": 30}
    assert sorted(checksums) == ["ema.safetensors", "model.safetensors", "state.pt"]
    fresh, fresh_ema = tiny(seed=5), tiny(seed=6)
    fresh.load_state_dict(ckpt.model)
    fresh_ema.load_state_dict(ckpt.ema)
    assert same(fresh, model) and same(fresh_ema, ema)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_save_replaces_atomically_and_recovers_old(tmp_path):
    a, b = tiny(seed=0), tiny(seed=1)
    save_checkpoint(tmp_path / "last", a, meta={"epoch": 1})
    save_checkpoint(tmp_path / "last", b, meta={"epoch": 2})
    assert load_checkpoint(tmp_path / "last").meta["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last"]  # no temporary or old directory left
    # a crash between "move old aside" and "rename new into place" leaves last.old only
    os.replace(tmp_path / "last", tmp_path / "last.old")
    assert load_checkpoint(tmp_path / "last").meta["epoch"] == 2


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix", "safetensors",
                                    "args_namespace"])
def test_load_foreign_layouts(tmp_path, layout):
    src = tiny(seed=0)
    sd = src.state_dict()
    path = tmp_path / "w.pth"
    if layout == "bare":
        torch.save(sd, path)
    elif layout == "state_dict":  # timm train.py
        torch.save({"state_dict": sd, "state_dict_ema": tiny(seed=2).state_dict(), "epoch": 3}, path)
    elif layout == "model":  # official DeiT / EViT / ToMe releases
        torch.save({"model": sd}, path)
    elif layout == "module_prefix":  # saved from a DDP wrapper
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif layout == "args_namespace":  # full training checkpoints carry their argparse options
        torch.save({"model": sd, "optimizer": {}, "epoch": 299, "args": argparse.Namespace(lr=5e-4)}, path)
    dst = tiny(seed=1)
    report = load_weights(dst, str(path))
    assert same(dst, src) and report["missing"] == [] and report["unexpected"] == []
    if layout == "state_dict":
        ema = tiny(seed=1)
        load_weights(ema, str(path), use_ema=True)
        assert same(ema, tiny(seed=2))


def test_load_from_run_dir_and_ema_errors(tmp_path):
    src = tiny(seed=0)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best", src, meta={"epoch": 1})
    dst = tiny(seed=1)
    load_weights(dst, str(tmp_path / "run"))
    assert same(dst, src)
    with pytest.raises(CheckpointError, match="no EMA"):
        load_state_dict(str(tmp_path / "run"), use_ema=True)
    torch.save({"model": src.state_dict()}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="no EMA weights under"):
        load_state_dict(str(tmp_path / "m.pth"), use_ema=True)


def test_finetune_adapts_head_and_position_embedding(tmp_path):
    src = tiny(num_classes=1000, img_size=32)
    save_weights(tmp_path / "w.safetensors", src.state_dict())
    dst = tiny(num_classes=10, img_size=64, seed=1)
    # another number of classes is refused unless asked for (new_head), with the opt-in named
    with pytest.raises(CheckpointError, match="(?s)head.weight.*finetune_new_head=true"):
        load_weights(dst, str(tmp_path / "w.safetensors"))
    with pytest.warns(UserWarning, match="head.weight"):
        report = load_weights(dst, str(tmp_path / "w.safetensors"), new_head=True)
    assert sorted(report["missing"]) == ["head.bias", "head.weight"]
    assert torch.equal(dst.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    assert dst.pos_embed.shape == (1, 257, 32)


@pytest.mark.parametrize("other", ["depth1", "depth3", "head_only", "wider"])
def test_other_architecture_is_refused_in_a_few_lines(tmp_path, other):
    model = tiny()  # depth 2, width 32
    if other == "head_only":
        sd = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    else:
        torch.manual_seed(0)
        kw = {"depth1": dict(depth=1), "depth3": dict(depth=3), "wider": dict(embed_dim=64)}[other]
        sd = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_heads=2, num_classes=10,
                               **{"embed_dim": 32, "depth": 2, **kw}).state_dict()
    save_weights(tmp_path / "w.safetensors", sd)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit") as err:
        load_weights(model, str(tmp_path / "w.safetensors"), adapt=False)
    assert len(str(err.value).splitlines()) <= 5
    expected = {"depth1": "missing: blocks.1.*", "depth3": "unexpected: blocks.2.*", "head_only": "missing",
                "wider": "of another shape"}[other]
    assert expected in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_save_keeps_the_only_complete_copy_and_clears_temporaries(tmp_path, monkeypatch):
    a, b = tiny(seed=0), tiny(seed=1)
    save_checkpoint(tmp_path / "last", a, meta={"epoch": 1})
    os.replace(tmp_path / "last", tmp_path / "last.old")  # killed between the two renames
    (tmp_path / ".last.tmp-killed").mkdir()  # and a temporary folder of a killed save
    assert find_checkpoint(tmp_path / "last") == str(tmp_path / "last.old")

    class Killed(BaseException):
        pass

    def die(pid, sig):
        raise Killed

    # killed again between the renames of the next save: the .old copy, the only complete
    # checkpoint, must still be there (it used to be deleted first)
    monkeypatch.setenv("IMAGEPIECE_KILL_AT", "save:last:renames")
    monkeypatch.setattr(os, "kill", die)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path / "last", b, meta={"epoch": 2})
    assert load_checkpoint(tmp_path / "last").meta["epoch"] == 1
    monkeypatch.delenv("IMAGEPIECE_KILL_AT")
    save_checkpoint(tmp_path / "last", b, meta={"epoch": 2})
    assert load_checkpoint(tmp_path / "last").meta["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last"]  # no .old, no temporary folder left


def test_bad_checkpoints(tmp_path):
    model = tiny()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(model, str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or unreadable checkpoint .*junk.pth"):
        load_weights(model, str(tmp_path / "junk.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CheckpointError, match="corrupt or unreadable safetensors .*junk.safetensors"):
        load_weights(model, str(tmp_path / "junk.safetensors"))
    torch.save({"model": model.state_dict(), "evil": Unsafe()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="never runs unsafe pickle"):
        load_weights(model, str(tmp_path / "unsafe.pth"))
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no weight of .*matches"):
        load_weights(model, str(tmp_path / "other.pth"))
    (tmp_path / "notckpt").mkdir()
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(tmp_path / "notckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


class Unsafe:
    """Any class outside torch's weights-only allowlist."""
