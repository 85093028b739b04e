"""Compiled graphs: every preset traces as one graph with no break, on timm and transformers
models (a graph break splits the reduction step into eager islands and costs speed)."""

import warnings

import pytest
import torch

import imagepiece
from conftest import tiny_vit
from imagepiece.plan import PRESETS


def _hf_vit():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                                   image_size=32, patch_size=4, intermediate_size=64)).eval()


# Every preset on timm; the runtime is shared, so the three methods suffice on transformers.
CASES = [("timm", p) for p in PRESETS] + [("transformers", p) for p in ("tome", "evit", "imagepiece")]


@pytest.mark.parametrize("family, preset", CASES)
def test_every_preset_compiles_to_one_graph(family, preset):
    model = tiny_vit(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2).eval() \
        if family == "timm" else _hf_vit()
    imagepiece.patch(model, preset)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    reasons = [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
