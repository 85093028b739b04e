import pytest
import torch

import imagepiece
from conftest import tiny_vit
from imagepiece.coherence import CoherenceStem, ResidualCoherence, add_coherence, coherence_mode


def test_residual_mode_leaves_a_model_unchanged_at_init():
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        add_coherence(model, "residual")
        assert coherence_mode(model) == "residual"
        assert isinstance(model.patch_embed.proj, ResidualCoherence)
        assert torch.equal(model(x), ref)
    # the linear patchify keeps its parameter names, so plain timm checkpoints still load
    assert "patch_embed.proj.weight" in model.state_dict()


def test_stem_mode_replaces_patchify_with_overlapping_convs():
    model = add_coherence(tiny_vit(), "stem")
    stem = model.patch_embed.proj
    assert isinstance(stem, CoherenceStem)
    convs = [m for m in stem.convs if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3  # patch 8 = 2^3: one stride-2 3x3 conv per factor of 2
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs)
    assert stem.out.kernel_size == (1, 1) and stem.out.out_channels == 48
    out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)


def test_stem_for_patch16_has_four_convs():
    stem = CoherenceStem(3, 384, 16)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in stem.convs) == 4
    assert stem(torch.randn(1, 3, 224, 224)).shape == (1, 384, 14, 14)


def test_coherence_raises_neighbour_similarity():
    """Overlapping receptive fields make adjacent patch embeddings more alike (the point of
    the bias): on a smooth image, neighbours agree more after the stem than after patchify."""
    torch.manual_seed(0)
    img = torch.nn.functional.interpolate(torch.randn(1, 3, 8, 8), size=64, mode="bilinear")
    lin = tiny_vit().patch_embed
    coh = add_coherence(tiny_vit(), "stem").eval().patch_embed

    def neighbour_cos(pe):
        t = pe(img).view(1, 8, 8, -1)
        return torch.nn.functional.cosine_similarity(t[:, :, 1:], t[:, :, :-1], dim=-1).mean()

    with torch.no_grad():
        assert neighbour_cos(coh) > neighbour_cos(lin)


@pytest.mark.parametrize("patch_size", [14, 6, 1])
def test_bad_patch_size(patch_size):
    model = tiny_vit(patch_size=patch_size, img_size=patch_size * 4)
    with pytest.raises(ValueError, match=f"patch size {patch_size}"):
        add_coherence(model, "stem")


def test_bad_mode_and_double_add():
    with pytest.raises(ValueError, match="coherence='conv'"):
        add_coherence(tiny_vit(), "conv")
    model = add_coherence(tiny_vit(), "residual")
    with pytest.raises(ValueError, match="already"):
        add_coherence(model, "stem")
    assert add_coherence(tiny_vit(), None) is not None


def test_coherence_with_reduction_trains():
    model = imagepiece.patch(add_coherence(tiny_vit(), "stem"), "imagepiece", keep_rate=0.6).train()
    loss = model(torch.randn(4, 3, 64, 64)).logsumexp(-1).mean()
    loss.backward()
    assert model.patch_embed.proj.convs[0].weight.grad.abs().sum() > 0


def _stem_with_statistics():
    torch.manual_seed(0)
    stem = CoherenceStem(3, 32, 4)
    with torch.no_grad():
        for m in stem.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return stem


def test_eval_folds_each_batchnorm_into_its_convolution():
    """In eval mode the stem runs each BatchNorm folded into its convolution: the same function
    (up to rounding) with one pass over the activations fewer per stage; training is untouched."""
    stem, x = _stem_with_statistics(), torch.randn(3, 3, 32, 32)
    unfolded = lambda m, x: m.out(torch.nn.Sequential(*m.convs)(x))  # noqa: E731  the layers one by one
    with torch.no_grad():
        stem.eval()
        folded = stem(x)
        reference = unfolded(stem, x)
        calls = []
        hooks = [m.register_forward_hook(lambda *a: calls.append(1))
                 for m in stem.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        stem(x)
        assert not calls  # BatchNorm did not run: it was folded
        for h in hooks:
            h.remove()
        assert torch.allclose(folded, reference, atol=1e-5) and not torch.equal(folded, reference * 0)
        stem.train()
        assert torch.equal(stem(x), unfolded(stem, x))  # batch statistics, as before


def test_folded_stem_compiles_without_graph_breaks():
    stem = _stem_with_statistics().eval()
    explained = torch._dynamo.explain(stem)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
