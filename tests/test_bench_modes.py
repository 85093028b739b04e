"""imagepiece bench beyond eager inference throughput (issue 13): training steps, latency,
torch.compile and ONNX Runtime backends; the registered-model baseline (issue 14, item 1)."""

import copy
import json
import statistics

import pytest
import timm
import torch
from typer.testing import CliRunner

import imagepiece  # noqa: F401 (registers the imagepiece_* models)
from imagepiece import bench
from imagepiece.bench import BenchConfig, run_benchmark
from imagepiece.cli import app
from imagepiece.measure import LimitViT, count_gmacs
from imagepiece.measure import backends as bench_backends

TINY = "vit_tiny_patch16_224"
TINY_KW = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)
TINY_ARGS = ["--model", TINY] + [a for k, v in TINY_KW.items() for a in ("--model-arg", f"{k}={v}")]
FAST = ["--threads", "1", "--warmup", "0", "--runs", "1", "--no-busy-check"]


def tiny_config(**overrides) -> BenchConfig:
    kw = dict(model=TINY, model_kwargs=dict(TINY_KW), warmup=0, runs=2, batch_sizes=(2,),
              threads=(1,), methods=("none", "evit"), busy_check=False)
    kw.update(overrides)
    return BenchConfig(**kw)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return timm.create_model(TINY, **{**TINY_KW, **overrides}).eval()


def no_amp():
    return torch.autocast("cpu", enabled=False)


# --------------------------------------------------------------------------------------
# Training steps
# --------------------------------------------------------------------------------------


def test_train_step_updates_weights():
    model = tiny_model(num_classes=5)
    before = copy.deepcopy(model.state_dict())
    fn, secs, err = bench_backends.build(model, "eager", "train", torch.randn(2, 3, 32, 32), 1,
                                         no_amp, torch.float32)
    assert err is None and secs > 0 and model.training
    fn(torch.randn(2, 3, 32, 32))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed and "blocks.0.attn.qkv.weight" in changed  # backward + step
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_train_mode_result():
    res = run_benchmark(tiny_config(mode="train", methods=("none", "evit", "tome")))
    assert [v.label for v in res.variants] == ["none", "evit", "tome"]
    for v in res.variants:
        assert v.mode == "train" and len(v.times) == 2 and len(v.limit_times) == 2
        assert v.speedup is not None and v.limit_speedup is not None and v.error is None
    assert res.variants[0].speedup == 1.0
    assert res.config["mode"] == "train"


def test_train_modules_are_own_copies_with_checkpointing():
    cfg = tiny_config(mode="train", grad_checkpointing=True)
    setup = bench._setup(cfg, tiny_model(), torch.Generator().manual_seed(0))
    mods = bench._group_modules(cfg, setup, "cpu")
    shared = {id(p) for m in setup.models.values() for p in m.parameters()}
    assert all(id(p) not in shared for m in mods.values() for p in m.parameters())
    assert all((m.model if isinstance(m, LimitViT) else m).grad_checkpointing
               for m in mods.values())
    infer = bench._group_modules(tiny_config(), setup, "cpu")
    assert not any(getattr(m, "grad_checkpointing", False) for m in infer.values())


def test_limit_checkpoints_and_matches_in_training():
    model = tiny_model(num_classes=5).train()
    tokens = [(65, 65), (65, 40), (40, 30), (30, 30)]
    x = torch.randn(2, 3, 32, 32)
    limit = LimitViT(model, tokens)
    ref = limit(x)
    limit.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    torch.testing.assert_close(limit(x), ref)


def test_amp_picks_bf16_on_cpu():
    res = run_benchmark(tiny_config(mode="train", amp=True, runs=1, limit=False))
    assert {v.dtype for v in res.variants} == {"bf16"}


# --------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------


def test_percentiles_and_ratios_from_known_times():
    t = [i / 1e3 for i in range(1, 101)]  # 1..100 ms
    base = [2 * s for s in t]
    s = bench._speeds(t, base, batch=1)
    assert s["ms_p50"] == pytest.approx(50.5) and s["ms_p90"] == pytest.approx(90.1)
    assert s["ms_p99"] == pytest.approx(99.01)
    assert s["speedup"] == pytest.approx(2.0) and s["speedup_rounds"] == pytest.approx(2.0)
    assert bench._speeds([], base, 1)["ms_p50"] is None
    assert bench._speeds(t, None, 1)["speedup"] is None


def test_latency_mode():
    res = run_benchmark(tiny_config(latency=True, batch_sizes=None, runs=2, calls=3))
    assert res.config["batch_sizes"] == [1] and res.config["calls"] == 3
    for v in res.variants:
        assert v.batch == 1 and len(v.times) == 6
        assert v.ms_p50 <= v.ms_p90 <= v.ms_p99
        assert v.ms_p50 == pytest.approx(statistics.median(v.times) * 1e3)
        assert v.reduction_share == pytest.approx(1 - statistics.median(v.limit_times)
                                                  / statistics.median(v.times))
    assert run_benchmark(tiny_config(latency=True, runs=1, limit=False)).config["calls"] == 10


def test_latency_cli_table():
    res = CliRunner().invoke(app, ["bench", *TINY_ARGS, *FAST, "--latency", "--calls", "2",
                                   "--method", "evit"])
    assert res.exit_code == 0, res.output
    for word in ("p50 ms", "p99 ms", "reduction share", "batch 1"):
        assert word in res.output


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def test_backends_run_what_they_say():
    model = imagepiece.patch(tiny_model(num_classes=5), "evit", keep_rate=0.6)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        eager = model(x)
    ort_fn, secs, err = bench_backends.build(model, "onnxruntime", "inference", x, 1, no_amp,
                                             torch.float32)
    assert err is None and secs > 0
    (out,) = ort_fn(x)
    assert type(out).__module__ == "numpy"
    torch.testing.assert_close(torch.from_numpy(out), eager, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    comp, _, err = bench_backends.build(model, "compile", "inference", x, 1, no_amp, torch.float32,
                                        compile_backend="aot_eager")
    assert err is None and isinstance(comp, torch._dynamo.eval_frame.OptimizedModule)
    with torch.inference_mode():
        torch.testing.assert_close(comp(x), eager, atol=1e-4, rtol=1e-4)


def test_compile_and_onnxruntime_groups_each_with_own_baseline():
    torch._dynamo.reset()
    res = run_benchmark(tiny_config(backends=("eager", "compile", "onnxruntime"), runs=1,
                                    compile_backend="aot_eager", limit=False))
    assert [(v.backend, v.label) for v in res.variants] == [
        (b, lab) for b in ("eager", "compile", "onnxruntime") for lab in ("none", "evit")]
    for v in res.variants:
        assert v.error is None and v.times
        assert (v.prep_s is None) == (v.backend == "eager")
        if v.label == "none":
            assert v.speedup == 1.0


def test_a_failing_backend_is_reported_and_others_run(monkeypatch, tmp_path):
    real = bench_backends._onnxruntime

    def fake(module, x, threads):
        if getattr(module, "imagepiece", None) is not None:
            raise RuntimeError("exporter gave up\nsecond line")
        return real(module, x, threads)

    monkeypatch.setattr(bench_backends, "_onnxruntime", fake)
    res = run_benchmark(tiny_config(backends=("onnxruntime",), methods=("none", "evit", "tome"),
                                    runs=1, limit=False))
    none, evit, tome = res.variants
    assert none.error is None and none.times and none.speedup == 1.0
    assert evit.error == tome.error == "RuntimeError: exporter gave up"
    assert evit.times == [] and evit.speedup is None and evit.ips_median is None
    from rich.console import Console

    console = Console(record=True, width=250)
    bench.render(res, console)
    assert "RuntimeError: exporter gave up" in console.export_text()
    bench.write_json(res, str(tmp_path / "r.json"))
    bench.write_csv(res, str(tmp_path / "r.csv"))
    bench.write_plot(res, str(tmp_path / "r.png"))
    assert json.loads((tmp_path / "r.json").read_text())["variants"][1]["error"]


def test_failing_baseline_leaves_ratios_empty(monkeypatch):
    real = bench_backends._onnxruntime

    def fake(module, x, threads):
        if getattr(module, "imagepiece", None) is None and not isinstance(module, LimitViT):
            raise ValueError("no baseline")
        return real(module, x, threads)

    monkeypatch.setattr(bench_backends, "_onnxruntime", fake)
    res = run_benchmark(tiny_config(backends=("onnxruntime",), runs=1))
    none, evit = res.variants
    assert none.error == "ValueError: no baseline" and evit.error is None
    assert evit.times and evit.speedup is None and evit.limit_speedup is None
    assert evit.reduction_share is not None


def test_cli_backends_print_their_tables():
    torch._dynamo.reset()
    res = CliRunner().invoke(app, ["bench", *TINY_ARGS, *FAST, "--method", "evit", "--backend",
                                   "onnxruntime", "--mode", "inference", "--no-limit"])
    assert res.exit_code == 0, res.output
    assert "onnxruntime" in res.output and "export s" in res.output


@pytest.mark.parametrize("args, word", [
    (["--mode", "serve"], "serve"),
    (["--backend", "tensorrt"], "tensorrt"),
    (["--backend", "onnxruntime", "--mode", "train"], "onnxruntime"),
    (["--grad-checkpointing"], "grad_checkpointing"),
    (["--calls", "0"], "calls=0"),
])
def test_cli_invalid_modes(args, word):
    res = CliRunner().invoke(app, ["bench", *TINY_ARGS, *args])
    assert res.exit_code == 2 and word in res.output
    assert "Traceback" not in res.output and "img/s" not in res.output


# --------------------------------------------------------------------------------------
# Issue 14, item 1: a registered imagepiece_* model is measured against itself unreduced
# --------------------------------------------------------------------------------------


def test_registered_model_baseline_is_unreduced():
    name = "imagepiece_vit_tiny_patch16_224"
    res = run_benchmark(tiny_config(model=name, methods=("none", "imagepiece"), runs=1))
    none, ip = res.variants
    torch.manual_seed(0)
    created = timm.create_model(name, **TINY_KW)
    assert created.imagepiece.plan.name != "none"  # created under a reducing plan
    unreduced = imagepiece.unpatch(created).eval()
    x = torch.randn(1, 3, 32, 32)
    assert none.gmacs == pytest.approx(count_gmacs(unreduced, x), rel=1e-9)
    n = unreduced.patch_embed.num_patches + unreduced.num_prefix_tokens
    assert none.tokens == [(n, n)] * len(unreduced.blocks)
    assert ip.gmacs < none.gmacs and ip.final_tokens < n


# --------------------------------------------------------------------------------------
# The GPU script (issue 13, item 5), exercised on the CPU
# --------------------------------------------------------------------------------------


def _gpu_script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "studies" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_dry_run(tmp_path, monkeypatch):
    fake = tmp_path / "src" / "tome"  # stands in for a checkout of the official ToMe code
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from . import patch\n")
    (fake / "patch.py").write_text("def timm(model):\n    import imagepiece\n"
                                   "    imagepiece.patch(model, 'tome', r=4)\n")
    monkeypatch.delitem(__import__("sys").modules, "tome", raising=False)
    monkeypatch.setattr(__import__("sys"), "path", list(__import__("sys").path))
    out = tmp_path / "res" / "gpu.txt"
    script = _gpu_script()
    assert script.main(["--dry-run", "--out", str(out), "--tome-src", str(tmp_path / "src")]) == 0
    text = " ".join(out.read_text().split())
    for words in ("cpu fp16, batch 2", "cpu bf16, batch 2", "imagepiece-hyper", "ToMe r=4, fp16: ours",
                  "ToMe r=4, bf16: ours"):
        assert words in text
    assert "official" in text and "skipped" not in text
    assert json.loads((tmp_path / "res" / "gpu_vit_tiny_patch16_224.json").read_text())["variants"]


def test_gpu_script_without_official_tome_or_gpu(tmp_path, monkeypatch, capsys):
    script = _gpu_script()
    monkeypatch.setattr(script, "_import_tome", lambda src: (_ for _ in ()).throw(ImportError("no tome")))
    args = script.parse_args(["--dry-run"])
    assert args.out is None and args.device == "cpu"
    assert "skipped (no tome)" in script.tome_beside_ours("vit_tiny_patch16_224", "bf16", args)
    if not torch.cuda.is_available():
        assert script.main([]) == 2 and "no CUDA device" in capsys.readouterr().err
