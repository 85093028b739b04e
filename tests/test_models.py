import pytest
import timm
import torch
from safetensors.torch import save_file

import imagepiece
from imagepiece.models import registered_models

SMALL = dict(img_size=64, patch_size=8, depth=4, num_classes=5)


def test_names_are_registered():
    names = set(timm.list_models("imagepiece_*"))
    assert set(registered_models()) <= names
    assert "imagepiece_deit_small_patch16_224" in names


def test_create_with_knobs():
    model = timm.create_model("imagepiece_deit_tiny_patch16_224", keep_rate=0.5, coherence="stem",
                              locality=0.3, **SMALL)
    assert imagepiece.is_patched(model)
    assert model.imagepiece.plan.keep_rate == 0.5
    assert imagepiece.coherence.coherence_mode(model) == "stem"
    model = timm.create_model("imagepiece_deit_tiny_patch16_224", plan="tome", r=5, coherence=None, **SMALL)
    assert model.imagepiece.plan.name == "tome"
    with pytest.raises(ValueError, match="keep_rate"):
        timm.create_model("imagepiece_deit_tiny_patch16_224", keep_rate=0, **SMALL)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("imagepiece_deit_tiny_patch16_224", **SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # the coherence branch is no longer zero
    path = tmp_path / "ip.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = timm.create_model("imagepiece_deit_tiny_patch16_224", checkpoint_path=str(path), **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_pretrained_base_weights_load_before_the_coherence_branch(tmp_path):
    """``pretrained=True`` loads the base timm weights (here from a local file, as a hub would
    give them); with the zero-initialised residual branch and no reduction the model is the
    pretrained model exactly."""
    torch.manual_seed(1)
    base = timm.create_model("deit_tiny_patch16_224", **SMALL).eval()
    path = tmp_path / "deit_tiny.safetensors"
    save_file(base.state_dict(), str(path))
    model = timm.create_model("imagepiece_deit_tiny_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=5),
                              plan="none", coherence="residual", **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() <= 1e-6
