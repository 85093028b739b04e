"""Hugging Face transformers models under the same one-line API, on the same runtime as timm.

Tiny random-weight models built from configs (nothing is downloaded): ViT, DeiT (with teacher),
DINOv2 (LayerScale), DINOv2 with registers and CLIP's vision tower.
"""

import copy
import io
import json
import pickle
import sys
import warnings

import pytest
import timm
import torch

import imagepiece

transformers = pytest.importorskip("transformers")

DIM = dict(hidden_size=48, num_hidden_layers=6, num_attention_heads=3, image_size=64, patch_size=8)
N_PATCHES = (64 // 8) ** 2


def _config(family: str):
    T = transformers
    if family in ("vit", "deit", "deit_teacher"):
        cls = T.ViTConfig if family == "vit" else T.DeiTConfig
        return cls(**DIM, intermediate_size=96, num_labels=5, layer_norm_eps=1e-6)
    if family == "dinov2":
        return T.Dinov2Config(**DIM, mlp_ratio=2, num_labels=5)
    if family == "dinov2_registers":
        return T.Dinov2WithRegistersConfig(**DIM, mlp_ratio=2, num_labels=5, num_register_tokens=3)
    return T.CLIPVisionConfig(**DIM, intermediate_size=96, projection_dim=16)


# family -> (model class, prefix tokens)
FAMILIES = {
    "vit": ("ViTForImageClassification", 1),
    "deit": ("DeiTForImageClassification", 2),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", 2),
    "dinov2": ("Dinov2ForImageClassification", 1),
    "dinov2_registers": ("Dinov2WithRegistersForImageClassification", 4),
    "clip": ("CLIPVisionModelWithProjection", 1),
}
TOWERS = {"vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model",
          "dinov2_registers": "Dinov2WithRegistersModel", "clip": "CLIPVisionModel"}

ZERO_PLANS = [("none", {}), ("tome", dict(r=0)), ("evit", dict(keep_rate=1.0)),
              ("imagepiece", dict(keep_rate=1.0)), ("imagepiece+tome", dict(r=0))]
REDUCING = [("tome", dict(r=4)), ("evit", dict(keep_rate=0.6)), ("imagepiece", dict(keep_rate=0.6)),
            ("imagepiece+tome", dict(r=4)), ("imagepiece-discard", dict(keep_rate=0.6))]


def make(family: str, impl: str = "sdpa", cls_name: str | None = None, **overrides):
    """A random-weight model; prefix tokens and LayerScale randomised so that they matter."""
    config = _config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name or FAMILIES[family][0])._from_config(
        config, attn_implementation=impl).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("cls_token", "distillation_token", "register_tokens", "lambda1")):
                p.normal_(0, 0.5)
    return model


def main(out) -> torch.Tensor:
    """The output a user reads: logits, CLIP's image embedding, or a tower's hidden states."""
    for key in ("logits", "image_embeds", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(out)


def images(n=3, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


# ---------------------------------------------------------------------------------------
# Zero reduction is the unpatched model, eager and SDPA
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_zero_reduction_reproduces_outputs(family, impl):
    model = make(family, impl)
    original = type(model)
    x = images()
    with torch.no_grad():
        ref = main(model(pixel_values=x))
        for plan, kw in ZERO_PLANS:
            imagepiece.patch(model, plan, **kw)
            assert (main(model(x)) - ref).abs().max() <= 1e-5, (family, plan)
        # scores recorded: every layer runs through the adapter's fused attention and layout
        model.imagepiece.plan = "none"
        model.imagepiece.record(scores=True)
        assert (main(model(x)) - ref).abs().max() <= 1e-5
        assert all(t.scores is not None for t in model.imagepiece.trace)
        imagepiece.unpatch(model)
        assert type(model) is original and not imagepiece.is_patched(model)
        assert all(type(m).__name__.startswith("Reduced") is False for m in model.modules())
        assert torch.equal(main(model(x)), ref)


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_bare_towers_zero_reduction(tower):
    model = make(tower, "eager", TOWERS[tower])
    x = images()
    with torch.no_grad():
        ref = model(x)
        imagepiece.patch(model, "none").imagepiece.record(scores=True)
        out = model(x)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5
    if ref.pooler_output is not None:
        assert (out.pooler_output - ref.pooler_output).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------
# The timm suite's invariants on every family
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan, kw", REDUCING)
def test_reducing_plans_keep_the_invariants(family, plan, kw):
    model = make(family)
    imagepiece.patch(model, plan, **kw).imagepiece.record(sources=True, scores=True)
    with torch.no_grad():
        out = main(model(images(n=2)))
    assert torch.isfinite(out).all()
    ctl = model.imagepiece
    P, n = ctl.num_prefix, N_PATCHES
    assert P == FAMILIES[family][1]
    trace = ctl.trace
    assert [t.tokens_out for t in trace] == [b for _, b in ctl.token_counts(P + n)]
    assert trace[-1].tokens_out < P + n
    last = trace[-1]
    src = last.source
    assert src.shape == (2, last.tokens_out, n)
    assert (src[:, :P] == 0).all()  # prefix tokens stand for no patch and stay in front
    assert torch.equal(last.size[:, :P], torch.ones(2, P))
    cover = src.sum(1)
    if plan == "imagepiece-discard":
        assert (cover <= 1).all() and (cover == 0).any()
    else:
        assert (cover == 1).all()  # a partition of the patches
        assert torch.allclose(last.size[:, P:].sum(1), torch.full((2,), float(n)))
        assert torch.allclose(last.size[:, P:], src[:, P:].sum(-1))


def test_batch_independence_and_determinism(family):
    model = make(family)
    x = images(n=4)
    for plan, kw in REDUCING[:3]:
        imagepiece.patch(model, plan, **kw)
        with torch.no_grad():
            batch = main(model(x))
            single = torch.cat([main(model(x[i:i + 1])) for i in range(4)])
            again = main(model(x))
        assert torch.allclose(batch, single, atol=1e-5), (family, plan)
        assert torch.equal(batch, again)


def test_training_gradients_flow(family):
    drop = dict(drop_path_rate=0.1) if family.startswith("dinov2") else dict(hidden_dropout_prob=0.1)
    model = make(family, **drop)
    imagepiece.patch(model, "imagepiece", keep_rate=0.6).train()
    main(model(images(n=4))).logsumexp(-1).mean().backward()
    unused = ("mask_token",)
    grads = {n: p.grad for n, p in model.named_parameters() if not any(u in n for u in unused)}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing
    last = [n for n in grads if ".5." in n and "fc2.weight" in n or "down_proj.weight" in n]
    assert last and all(grads[n].abs().sum() > 0 for n in last)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = imagepiece.patch(make("vit"), "imagepiece", keep_rate=0.6).train()
        if ckpt:  # renamed from gradient_checkpointing_enable after 5.18, our floor
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        main(model(images(n=2))).sum().backward()
        grads.append(model.vit.layers[0].attention.q_proj.weight.grad)
    assert (grads[1] - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_dinov2_head_averages_patch_tokens_by_size():
    model = imagepiece.patch(make("dinov2_registers"), "tome", r=6)
    x = images(n=2)
    with torch.no_grad():
        logits = model(x).logits
        out = model.dinov2_with_registers(x)
        seq, size = out.last_hidden_state, out.token_sizes
        P = model.imagepiece.num_prefix
        w = size[:, P:, None]
        pooled = (seq[:, P:] * w).sum(1) / w.sum(1)
        expected = model.classifier(torch.cat([seq[:, 0], pooled], 1))
        plain = model.classifier(torch.cat([seq[:, 0], seq[:, P:].mean(1)], 1))
    assert torch.allclose(logits, expected, atol=1e-6)
    assert not torch.allclose(logits, plain, atol=1e-4)


def test_plan_change_copy_and_errors():
    model = make("deit_teacher")
    x = images(n=2)
    with torch.no_grad():
        ref = main(model(x))
        imagepiece.patch(model, "tome", r=4)
        reduced = main(model(x))
        model.imagepiece.plan = "none"
        assert (main(model(x)) - ref).abs().max() <= 1e-5
        model.imagepiece.plan = imagepiece.make_plan("tome", depth=6, r=4)
        assert torch.equal(main(model(x)), reduced)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # stays patched
            assert imagepiece.is_patched(clone) and torch.equal(main(clone(x)), reduced)
        with pytest.raises(ValueError, match="not supported on a token-reduced"):
            model(x, output_attentions=True)
    assert repr(model.imagepiece).endswith("family='transformers')")


def test_unsupported_transformers_models_raise_type_error():
    mim = make("vit", cls_name="ViTForMaskedImageModeling")
    with pytest.raises(TypeError, match="supported: .*ViTForImageClassification"):
        imagepiece.patch(mim, "tome")
    assert not imagepiece.is_patched(mim)
    assert "Dinov2Model" in imagepiece.supported_models()


def test_missing_transformers_says_how_to_install(monkeypatch):
    fake = type("ViTModel", (torch.nn.Module,), {"__module__": "transformers.models.vit.modeling_vit"})
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "imagepiece.patch.hf", raising=False)
    monkeypatch.delattr(sys.modules["imagepiece.patch"], "hf", raising=False)
    with pytest.raises(ImportError, match=r'pip install "imagepiece\[hf\]"'):
        imagepiece.patch(fake(), "tome")


def test_save_pretrained_folder_loads_for_the_tools(tmp_path):
    from imagepiece.patch import describe, hf, use_method

    model = make("deit_teacher")
    model.save_pretrained(tmp_path / "deit")
    loaded = hf.load_pretrained(str(tmp_path / "deit"))
    assert type(loaded) is type(model) and not loaded.training
    assert describe(loaded) == (6, (64, 64), 3, 2 + N_PATCHES, (8, 8))
    assert describe(imagepiece.patch(make("dinov2"), "tome"))[:4] == (6, (64, 64), 3, 1 + N_PATCHES)
    x = images(n=2)
    with torch.no_grad():
        for m in (model, loaded):
            use_method(m, "imagepiece:keep_rate=0.7")
        assert torch.equal(main(loaded(x)), main(model(x)))
    with pytest.raises(TypeError, match="not supported"):
        make("vit", cls_name="ViTForMaskedImageModeling").save_pretrained(tmp_path / "mim")
        hf.load_pretrained(str(tmp_path / "mim"))


# ---------------------------------------------------------------------------------------
# Cross-framework: a timm ViT/DeiT and the transformers one with the same weights
# ---------------------------------------------------------------------------------------

_TOP = {"cls_token": "embeddings.cls_token", "dist_token": "embeddings.distillation_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def timm_to_transformers(sd: dict, tower: str, head: str) -> dict:
    """A timm ViT/DeiT state dict in transformers' layout (fused qkv split into q, k, v)."""
    out = {}
    for key, v in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            base = f"{tower}.layers.{i}."
            if module == "attn.qkv":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3), strict=True):
                    out[f"{base}attention.{name}.{kind}"] = part
            else:
                out[f"{base}{_BLOCK[module]}.{kind}"] = v
        elif key in _TOP:
            out[f"{tower}.{_TOP[key]}"] = v
        else:
            module, kind = key.rsplit(".", 1)
            name = head if module == "head" else "distillation_classifier"
            out[f"{name}.{kind}"] = v
    return out


CROSS = {"vit": ("vit_tiny_patch16_224", "ViTForImageClassification", "vit", "classifier", "vit"),
         "deit_distilled": ("deit_tiny_distilled_patch16_224",
                            "DeiTForImageClassificationWithTeacher", "deit", "cls_classifier",
                            "deit_teacher")}


def _pair(arch: str):
    timm_name, _, tower, head, family = CROSS[arch]
    torch.manual_seed(0)
    tm = timm.create_model(timm_name, img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3,
                           mlp_ratio=2, num_classes=5).eval()
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if "token" in n:
                p.normal_(0, 0.5)
    hm = make(family)
    hm.load_state_dict(timm_to_transformers(tm.state_dict(), tower, head), strict=True)
    return tm, hm


@pytest.mark.parametrize("arch", sorted(CROSS))
@pytest.mark.parametrize("plan, kw", [("none", {}), ("tome", dict(r=8)), ("evit", dict(keep_rate=0.7)),
                                      ("imagepiece", dict(keep_rate=0.7))])
def test_timm_and_transformers_agree(arch, plan, kw):
    tm, hm = _pair(arch)
    x = images(n=3)
    with torch.no_grad():
        for m in (tm, hm):
            imagepiece.patch(m, plan, **kw)
        a, b = tm(x), hm(x).logits
        assert (a - b).abs().max() <= 1e-4, (arch, plan)
    counts = [[t.tokens_out for t in m.imagepiece.trace] for m in (tm, hm)]
    assert counts[0] == counts[1]
    if plan != "none":
        assert counts[0][-1] < 1 + int(arch == "deit_distilled") + N_PATCHES


# ---------------------------------------------------------------------------------------
# torch.compile and ONNX export of a patched transformers ViT
# ---------------------------------------------------------------------------------------


class Logits(torch.nn.Module):
    """Tensor in, tensor out, for export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def test_compile_matches_eager():
    model = imagepiece.patch(make("vit"), "imagepiece", keep_rate=0.6)
    x = images(n=2)
    with torch.inference_mode():
        eager = model(x).logits
        torch._dynamo.reset()
        out = torch.compile(model, backend="aot_eager")(x).logits
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


def test_onnx_export_matches_eager():
    ort = pytest.importorskip("onnxruntime")
    model = Logits(imagepiece.patch(make("vit"), "imagepiece", keep_rate=0.6))
    x = images(n=2)
    with torch.inference_mode():
        eager = model(x)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False,
                          input_names=["images"], output_names=["logits"])
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), eager, atol=1e-4, rtol=1e-4)
    other = images(n=2, seed=5)
    with torch.inference_mode():
        ref = model(other)
    (out2,) = session.run(None, {"images": other.numpy()})
    torch.testing.assert_close(torch.from_numpy(out2), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Issue 22: return_dict, gradient checkpointing in bench, unsafe pickle in a folder
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dinov2", "dinov2_registers"])
def test_dinov2_classifier_return_dict_false_gives_a_tuple(family):
    """Item 9: a patched DINOv2 classifier behaves as the unpatched one with return_dict=False."""
    model, x = make(family), images(n=2)
    with torch.no_grad():
        ref = model(x, return_dict=False)
        for plan in ("none", "tome"):
            imagepiece.patch(model, plan, **({"r": 4} if plan == "tome" else {}))
            out = model(x, return_dict=False)
            assert isinstance(out, tuple) and len(out) == len(ref)
            if plan == "none":
                assert (out[0] - ref[0]).abs().max() <= 1e-5
            assert torch.equal(out[0], model(x).logits)


def test_bench_train_grad_checkpointing_uses_the_transformers_switch():
    """Item 10: bench --mode train --grad-checkpointing on a transformers model turns on the
    family's own checkpointing (every variant and every limit), instead of an AttributeError."""
    from imagepiece import bench
    from imagepiece.measure import LimitViT

    cfg = bench.BenchConfig(model="folder", methods=("none", "evit"), mode="train",
                            grad_checkpointing=True, busy_check=False)
    setup = bench._setup(cfg, make("vit"), torch.Generator().manual_seed(0))
    mods = bench._group_modules(cfg, setup, "cpu")
    assert any(isinstance(m, LimitViT) for m in mods.values())
    for m in mods.values():
        layers = (m.model if isinstance(m, LimitViT) else m).vit.layers
        assert all(layer.gradient_checkpointing for layer in layers)


def test_folder_with_unsafe_pickle_is_refused_in_one_line(tmp_path):
    """Item 14: a pytorch_model.bin holding a pickled call is refused with one line by every
    tool, and the call never runs."""
    import os

    from typer.testing import CliRunner

    from imagepiece.cli import app
    from imagepiece.patch import load_transformers

    class Call:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "ran"),))

    model = make("vit")
    folder = tmp_path / "evil"
    model.config.architectures = ["ViTForImageClassification"]
    model.config.save_pretrained(folder)
    torch.save({**model.state_dict(), "x": Call()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"os\.makedirs.*never runs unsafe pickle"):
        load_transformers(str(folder))
    res = CliRunner().invoke(app, ["bench", "--model", str(folder), "--method", "evit", "--runs", "1"])
    assert res.exit_code == 2 and "never runs unsafe pickle" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("family", ["vit", "deit_teacher", "dinov2", "clip"])
def test_model_r_on_the_top_level_model_and_save_pretrained_keeps_the_class(family, tmp_path):
    """ToMe's ``model.r = 4`` on a transformers classifier (whose class the patch once left
    alone, so the assignment silently set a stray attribute), and a folder saved from a patched
    model naming the original class, so that it loads back."""
    model = make(family)
    cls = type(model)
    imagepiece.patch(model, "tome", r=6)
    model.r = 2
    assert model.r == 2
    assert model.imagepiece.plan == imagepiece.make_plan("tome", DIM["num_hidden_layers"], r=2)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [cls.__name__]
    assert type(model).__name__ == f"Reduced{cls.__name__}"  # still patched after saving
    back = getattr(transformers, cls.__name__).from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, DIM["image_size"], DIM["image_size"])
    with torch.no_grad():
        assert torch.allclose(main(imagepiece.patch(back, "tome", r=2)(x)), main(model(x)), atol=1e-5)
