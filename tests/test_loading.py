"""One way to open a model by name for every tool: timm names, shipped models, transformers
folders, with safe weight loading and one-line errors."""

import pytest
import torch
from safetensors.torch import save_file

from imagepiece.coherence import coherence_mode
from imagepiece.loading import ModelLoadError, OpenedModel, check_model_name, open_model
from imagepiece.patch import is_patched

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=3)
X = torch.randn(2, 3, 32, 32)


def _logits(model):
    with torch.no_grad():
        return model(X)


def test_random_timm_weights_are_seeded_and_the_model_is_unpatched_in_eval_mode():
    a = open_model("vit_tiny_patch16_224", model_kwargs=TINY, seed=3)
    b = open_model("vit_tiny_patch16_224", model_kwargs=TINY, seed=3)
    c = open_model("vit_tiny_patch16_224", model_kwargs=TINY, seed=4)
    assert isinstance(a, OpenedModel) and a.weights == "random" and a.folder is None
    assert not a.model.training and not is_patched(a.model)
    assert torch.equal(_logits(a.model), _logits(b.model))
    assert not torch.equal(_logits(a.model), _logits(c.model))


def test_checkpoint_weights_are_loaded_and_named(tmp_path):
    source = open_model("vit_tiny_patch16_224", model_kwargs=TINY, seed=1).model
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    opened = open_model("vit_tiny_patch16_224", str(path), model_kwargs=TINY, seed=2)
    assert opened.weights == f"checkpoint {path}"
    assert torch.equal(_logits(opened.model), _logits(source))
    other = dict(TINY, num_classes=5)  # a head of another size: every key must fit
    with pytest.raises(ModelLoadError, match="head"):
        open_model("vit_tiny_patch16_224", str(path), model_kwargs=other)
    with pytest.raises(ModelLoadError, match="missing.safetensors"):
        open_model("vit_tiny_patch16_224", str(tmp_path / "missing.safetensors"), model_kwargs=TINY)


def test_registered_imagepiece_models_come_unreduced_with_their_coherence_branch():
    opened = open_model("imagepiece_vit_tiny_patch16_224", model_kwargs=dict(TINY, coherence="stem"))
    assert not is_patched(opened.model) and coherence_mode(opened.model) == "stem"
    assert _logits(opened.model).shape == (2, 3)


def test_shipped_models_open_with_their_weights_and_refuse_timm_options():
    opened = open_model("shipped:baseline")
    assert opened.weights == "shipped model 'baseline'" and not is_patched(opened.model)
    for options in (dict(checkpoint="w.pth"), dict(pretrained=True), dict(model_kwargs={"depth": 2})):
        with pytest.raises(ModelLoadError, match="apply to timm names"):
            open_model("shipped:baseline", **options)
    with pytest.raises(ModelLoadError, match="unknown shipped model 'nope'"):
        open_model("shipped:nope")


def test_unknown_names_and_bad_model_arguments_fail_in_one_line():
    with pytest.raises(ModelLoadError, match="unknown model 'deit_smal_patch16_224'.*Did you mean"):
        open_model("deit_smal_patch16_224")
    with pytest.raises(ModelLoadError, match="unknown model 7"):
        check_model_name(7)
    assert check_model_name("shipped:anything") == "shipped:anything"
    with pytest.raises(ModelLoadError, match=r"cannot create timm model 'vit_tiny_patch16_224' with \{'dep"):
        open_model("vit_tiny_patch16_224", model_kwargs={"depht": 2})


def test_transformers_folders_open_with_their_own_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "vit")
    opened = open_model(str(tmp_path / "vit"))
    assert opened.folder == str(tmp_path / "vit") and opened.weights.startswith("transformers, from")
    with torch.no_grad():
        assert torch.equal(opened.model(X).logits, model(X).logits)
    with pytest.raises(ModelLoadError, match="apply to timm names"):
        open_model(str(tmp_path / "vit"), checkpoint="w.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load the transformers model"):
        open_model(str(tmp_path / "empty"))
