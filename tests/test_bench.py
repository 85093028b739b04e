import csv
import json
import math

import pytest
import timm
import torch
from typer.testing import CliRunner

import imagepiece
from imagepiece import bench
from imagepiece.bench import BenchConfig, BenchError, run_benchmark
from imagepiece.cli import app
from imagepiece.measure import LimitViT, count_gmacs
from imagepiece.plan import MethodError, parse_method

TINY = "vit_tiny_patch16_224"
TINY_KW = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)
TINY_ARGS = ["--model", TINY] + [a for k, v in TINY_KW.items() for a in ("--model-arg", f"{k}={v}")]


def tiny_config(**overrides) -> BenchConfig:
    kw = dict(model=TINY, model_kwargs=dict(TINY_KW), warmup=1, runs=2, batch_sizes=(2,),
              threads=(1,), methods=("none", "tome", "evit", "imagepiece", "imagepiece:keep_rate=0.5"),
              busy_check=False)
    kw.update(overrides)
    return BenchConfig(**kw)


@pytest.fixture(scope="module")
def result():
    return run_benchmark(tiny_config())


def test_result_structure(result):
    labels = [v.label for v in result.variants]
    assert labels == ["none", "tome", "evit", "imagepiece", "imagepiece:keep_rate=0.5"]
    assert result.random_weights and "random" in result.weights
    assert result.machine["torch"] == torch.__version__ and result.machine["cpu"]
    for v in result.variants:
        assert len(v.times) == 2 and len(v.limit_times) == 2
        assert v.ips_min <= v.ips_q1 <= v.ips_median <= v.ips_q3 <= v.ips_max
        assert v.batch == 2 and v.threads == 1 and v.device == "cpu" and v.dtype == "fp32"
        assert v.efficiency == pytest.approx(v.speedup / v.limit_speedup)
        assert v.peak_mem_mib is None  # CPU: n/a by design
    base = result.variants[0]
    assert base.speedup == 1.0 and base.speedup_rounds == 1.0 and base.speedup_best == 1.0
    assert base.gmacs == pytest.approx(base.limit_gmacs, rel=1e-6)


def test_gmacs_and_limit_gmacs(result):
    base = result.variants[0]
    for v in result.variants[1:]:
        assert v.gmacs < base.gmacs
        # the plan only adds the (small) scoring and matching products to its limit
        assert v.limit_gmacs <= v.gmacs <= 1.1 * v.limit_gmacs
    gm = {v.label: v.gmacs for v in result.variants}
    assert gm["imagepiece:keep_rate=0.5"] < gm["imagepiece"]


def test_token_counts_match_plan(result):
    torch.manual_seed(0)
    model = timm.create_model(TINY, **TINY_KW).eval()
    n = model.patch_embed.num_patches + 1
    for v in result.variants[1:]:
        name, knobs = parse_method(v.label)
        patched = imagepiece.patch(timm.create_model(TINY, **TINY_KW).eval(), name, **knobs)
        assert v.tokens == patched.imagepiece.token_counts(n)
        patched(torch.randn(1, 3, 32, 32))
        assert [t.tokens_out for t in patched.imagepiece.trace] == [b for _, b in v.tokens]
    assert result.variants[0].tokens == [(n, n)] * 4


def test_limit_runs_pre_cut_sequences():
    torch.manual_seed(0)
    model = timm.create_model(TINY, **TINY_KW).eval()
    x = torch.randn(2, 3, 32, 32)
    n = model.patch_embed.num_patches + 1
    with torch.inference_mode():
        same = LimitViT(model, [(n, n)] * 4)(x)
        torch.testing.assert_close(same, model(x), atol=1e-5, rtol=1e-5)
        assert LimitViT(model, [(n, n), (n, 30), (30, 20), (20, 20)])(x).shape == (2, 1000)


def test_parse_method():
    assert parse_method("evit") == ("evit", {})
    assert parse_method("evit:keep_rate=0.5") == ("evit", {"keep_rate": 0.5})
    assert parse_method("imagepiece:keep_rate=0.5,blocks=1;4;7") == (
        "imagepiece", {"keep_rate": 0.5, "blocks": (1, 4, 7)})
    assert parse_method("tome:r=16;-0.5,prop_attn=false") == ("tome", {"r": (16, -0.5),
                                                                     "prop_attn": False})
    for bad in ("evitt", "evit:keep_rate", "evit:=3", ""):
        with pytest.raises(MethodError):
            parse_method(bad)


def test_sweeps_expand_variants_and_groups():
    cfg = tiny_config(methods=("evit", "tome", "imagepiece:keep_rate=0.4"), keep_rates=(0.5, 0.8),
                      rs=(2, 4), batch_sizes=(1, 3), warmup=0, runs=1, limit=False)
    res = run_benchmark(cfg)
    labels = ["none", "evit:keep_rate=0.5", "evit:keep_rate=0.8", "tome:r=2", "tome:r=4",
              "imagepiece:keep_rate=0.4"]
    assert [v.label for v in res.variants] == labels * 2
    assert [v.batch for v in res.variants] == [1] * 6 + [3] * 6
    assert all(v.limit_speedup is None and v.efficiency is None for v in res.variants)


def test_output_files(result, tmp_path):
    j, c, p = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    bench.write_json(result, str(j))
    bench.write_csv(result, str(c))
    bench.write_plot(result, str(p))
    data = json.loads(j.read_text())
    assert [v["label"] for v in data["variants"]] == [v.label for v in result.variants]
    assert data["random_weights"] is True and data["config"]["model"] == TINY
    rows = list(csv.DictReader(c.open()))
    assert len(rows) == len(result.variants)
    assert math.isclose(float(rows[1]["gmacs"]), result.variants[1].gmacs)
    assert rows[0]["peak_mem_mib"] == ""
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("overrides, words", [
    (dict(model="no_such_model"), ["no_such_model", "timm.list_models"]),
    (dict(methods=("evitt",)), ["evitt", "allowed"]),
    (dict(methods=("evit:keep=0.5",)), ["keep", "keep_rate"]),
    (dict(methods=("evit:keep_rate=1.5",)), ["keep_rate=1.5"]),
    (dict(methods=("tome:r=-1",)), ["r=-1"]),
    (dict(devices=("tpu",)), ["tpu", "cpu, cuda"]),
    (dict(dtypes=("fp8",)), ["fp8", "fp32, fp16, bf16"]),
    (dict(batch_sizes=(0,)), ["batch size=0"]),
    (dict(runs=0), ["runs=0"]),
    (dict(threads=(0,)), ["threads=0"]),
    (dict(keep_rates=(0.0,)), ["0.0"]),
    (dict(checkpoint="/no/such/file.pth"), ["/no/such/file.pth"]),
    (dict(allocator="jemalloc"), ["jemalloc", "steady, default"]),
    # modes, latency and backends (--mode, --latency, --backend)
    (dict(mode="serve"), ["serve", "inference, train"]),
    (dict(backends=("tensorrt",)), ["tensorrt", "eager, compile, onnxruntime"]),
    (dict(backends=("onnxruntime",), mode="train"), ["onnxruntime", "training"]),
    (dict(backends=("onnxruntime",), dtypes=("bf16",)), ["onnxruntime", "bf16"]),
    (dict(backends=("onnxruntime",), amp=True), ["onnxruntime", "amp"]),
    (dict(backends=("compile",), compile_backend="nope"), ["nope", "inductor"]),
    (dict(grad_checkpointing=True), ["grad_checkpointing", "train"]),
    (dict(amp=True, dtypes=("fp16",)), ["amp", "fp16"]),
    (dict(calls=0), ["calls=0"]),
    (dict(latency=True, batch_sizes=(0,)), ["batch size=0"]),
])
def test_invalid_requests_fail_before_timing(overrides, words):
    def no_timing(*args):
        raise AssertionError("timing started for an invalid request")

    with pytest.raises(BenchError) as err:
        run_benchmark(tiny_config(**overrides), progress=no_timing)
    for w in words:
        assert w in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a missing GPU")
def test_cuda_absent_is_clear():
    with pytest.raises(BenchError, match="CUDA is not available"):
        run_benchmark(tiny_config(devices=("cuda",)))


def test_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model(TINY, **TINY_KW)
    path = tmp_path / "ck.pth"
    torch.save({"model": model.state_dict()}, path)
    res = run_benchmark(tiny_config(checkpoint=str(path), methods=("evit",), runs=1, warmup=0,
                                    limit=False))
    assert not res.random_weights and str(path) in res.weights


def test_cli(tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["bench", *TINY_ARGS, "--method", "evit:keep_rate=0.5",
                              "--method", "tome:r=4", "--batch", "2", "--threads", "1",
                              "--warmup", "0", "--runs", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "random" in res.output and "evit:keep_rate=0.5" in res.output
    assert "tome:r=4" in res.output and "efficiency" in res.output
    assert [v["label"] for v in json.loads(out.read_text())["variants"]] == [
        "none", "evit:keep_rate=0.5", "tome:r=4"]


@pytest.mark.parametrize("args, word", [
    (["--model", "no_such_model"], "no_such_model"),
    (["--method", "magic"], "magic"),
    (["--device", "tpu"], "tpu"),
    (["--batch", "0"], "batch size=0"),
    (["--runs", "0"], "runs=0"),
    (["--dtype", "int4"], "int4"),
])
def test_cli_invalid(args, word):
    res = CliRunner().invoke(app, ["bench", *TINY_ARGS, *args])
    assert res.exit_code != 0
    assert word in res.output
    assert "img/s" not in res.output


def test_render_flags_noisy_timings(result):
    from rich.console import Console

    quiet = Console(record=True, width=200)
    bench.render(result, quiet)
    text = quiet.export_text()
    assert "efficiency" in text and "imagepiece:keep_rate=0.5" in text
    v = result.variants[1]
    noisy = bench.BenchResult(result.config, result.machine, True, result.weights, [
        result.variants[0],
        bench.VariantResult(**{**v.__dict__, "ips_q1": v.ips_median * 0.5, "ips_q3": v.ips_median}),
    ])
    loud = Console(record=True, width=200)
    bench.render(noisy, loud)
    assert "noisy timings" in loud.export_text()


def test_gmacs_count_attention_exactly():
    """Every matmul counts, attention included (the fused CPU kernel has no flop formula)."""
    import timm


    D, N, depth, P = 64, 65, 2, 64  # 8x8 patches of 4 px + class token
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=D, num_heads=2,
                          depth=depth, num_classes=10).eval()
    linear = depth * N * (3 * D * D + D * D + 2 * 4 * D * D)  # qkv, proj, MLP (ratio 4)
    attention = depth * 2 * N * N * D  # q @ k^T and attn @ v
    expected = linear + attention + P * 3 * 16 * D + D * 10  # + patch embedding + head
    assert count_gmacs(m, torch.randn(2, 3, 32, 32)) * 1e9 == pytest.approx(expected, rel=1e-9)
