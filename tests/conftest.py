import json
import os

import pytest
import timm
import torch

torch.set_num_threads(2)


def tiny_vit(**overrides):
    """A small random-weight timm ViT (64 patches of 8x8 px) that runs in milliseconds."""
    kwargs = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=7)
    kwargs.update(overrides)
    name = kwargs.pop("name", "vit_tiny_patch16_224")
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


# Every architecture family the README claims, as (timm name, kwargs, input size).
# Small widths/depths keep the suite fast; the full DeiT sizes are covered in test_patch.
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=6), 64),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64, patch_size=8, depth=6), 64),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(img_size=64, patch_size=8, depth=6,
                                                        embed_dim=96, num_heads=3), 64),
    "registers_gap": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=6, reg_tokens=4,
                                                   class_token=False, global_pool="avg"), 64),
    "registers_cls": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=6, reg_tokens=2), 64),
    "qk_norm": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=6, qk_norm=True), 64),
    "no_class_token": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=6,
                                                    class_token=False, global_pool="avg"), 64),
    "size_384": ("vit_tiny_patch16_224", dict(img_size=384, depth=4), 384),
    "dynamic_size": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=6,
                                                  dynamic_img_size=True), 96),
}


def make_family(family: str):
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    # Random init of LayerScale/registers is tiny or zero; make them matter.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "reg_token" in n or "cls_token" in n or "dist_token" in n or ".gamma" in n:
                p.normal_(0, 0.5)
    return model, size


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def read_log(run_dir) -> list[dict]:
    """A run's log.jsonl rows without the wall-clock fields, which differ between runs."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        row.pop("images_per_s")
        row.pop("epoch_s")
    return rows
