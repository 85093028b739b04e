"""Patched models under torch.compile and exported to ONNX give the eager result."""

import io
import warnings

import pytest
import timm
import torch

import imagepiece

PLANS = {
    "tome": dict(r=4),
    "evit": dict(keep_rate=0.6),
    "imagepiece": dict(keep_rate=0.6),
}


def small_model(plan: str):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64,
                              depth=4, num_heads=2, num_classes=10).eval()
    return imagepiece.patch(model, plan, **PLANS[plan])


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("plan", list(PLANS))
def test_compile_matches_eager(plan, images):
    model = small_model(plan)
    with torch.inference_mode():
        eager = model(images)
        counts = [t.tokens_out for t in model.imagepiece.trace]
        torch._dynamo.reset()
        # "aot_eager" traces exactly what inductor would receive, without minutes of C++
        # compilation on a small CI machine; the graph capture is what patching must survive.
        compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
        out = compiled(images)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    assert counts == [b for _, b in model.imagepiece.token_counts(65)]


def test_inductor_compile_matches_eager(images):
    # One real inductor compile (about 30 s on 2 cores): the most involved plan.
    model = small_model("imagepiece")
    with torch.inference_mode():
        eager = model(images)
        torch._dynamo.reset()
        out = torch.compile(model)(images)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


def _export(model, x) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False,
                          input_names=["images"], output_names=["logits"])
    return buf.getvalue()


@pytest.mark.parametrize("plan", list(PLANS))
def test_onnx_export_matches_eager(plan, images):
    ort = pytest.importorskip("onnxruntime")
    model = small_model(plan)
    with torch.inference_mode():
        eager = model(images)
    session = ort.InferenceSession(_export(model, images), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), eager, atol=1e-4, rtol=1e-4)
    # the exported graph has static token counts, so another batch of the same size runs too
    other = torch.randn_like(images)
    with torch.inference_mode():
        ref = model(other)
    (out2,) = session.run(None, {"images": other.numpy()})
    torch.testing.assert_close(torch.from_numpy(out2), ref, atol=1e-4, rtol=1e-4)
