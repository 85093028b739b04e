"""imagepiece bench --profile: torch.profiler split of a forward pass into the block compute and
the reduction's parts (imagepiece.measure.profile)."""

import timm
import torch
from typer.testing import CliRunner

import imagepiece
from imagepiece import ops, runtime
from imagepiece.cli import app
from imagepiece.measure.profile import PARTS, profile_forward

TINY_KW = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2)
ARGS = ["--model", "vit_tiny_patch16_224"] + [a for k, v in TINY_KW.items()
                                             for a in ("--model-arg", f"{k}={v}")]


def _model(spec):
    torch.manual_seed(0)
    return imagepiece.patch(timm.create_model("vit_tiny_patch16_224", **TINY_KW).eval(), spec)


def _parts(spec):
    rows = profile_forward(_model(spec), torch.randn(2, 3, 32, 32), runs=2, warmup=1)
    assert [r.part for r in rows] == list(PARTS)
    return {r.part: r for r in rows}


def test_each_method_shows_its_own_parts_and_nothing_else():
    tome, evit, none = _parts("tome:r=4"), _parts("evit:keep_rate=0.5"), _parts("none")
    assert tome["matching"].ops > 0 and tome["state"].ops > 0 and tome["ranking"].ops == 0
    assert tome["bias"].ops > 0  # proportional attention
    assert evit["ranking"].ops > 0 and evit["scores"].ops > 0 and evit["matching"].ops == 0
    assert none["block"].ops > 0
    assert all(none[p].ops == 0 and none[p].ms == 0 for p in ("scores", "matching", "state"))
    for parts in (tome, evit, none):
        assert all(r.ms >= 0 for r in parts.values())


def test_profiling_leaves_the_library_unwrapped_and_the_output_unchanged():
    before = (ops.bipartite_matching, runtime._merge_state, runtime._block_step)
    model, x = _model("imagepiece"), torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    profile_forward(model, x, runs=1, warmup=0)
    assert (ops.bipartite_matching, runtime._merge_state, runtime._block_step) == before
    with torch.inference_mode():
        assert torch.equal(model(x), expected)


def test_bench_profile_command(tmp_path):
    out = tmp_path / "p.json"
    res = CliRunner().invoke(app, ["bench", *ARGS, "--method", "tome:r=4", "--profile", "--runs", "1",
                                   "--warmup", "0", "-b", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "matching" in res.output and "reduction" in res.output
    import json

    data = json.loads(out.read_text())
    assert set(data["profile"]) == {"none", "tome:r=4"}
    assert any(r["part"] == "matching" and r["ops"] > 0 for r in data["profile"]["tome:r=4"])


def test_bench_profile_refuses_what_it_cannot_profile(tmp_path):
    for extra, word in ((["--mode", "train"], "--mode train"), (["--csv", str(tmp_path / "a.csv")], "--csv"),
                        (["--backend", "compile"], "--backend compile")):
        res = CliRunner().invoke(app, ["bench", *ARGS, "--profile", *extra])
        assert res.exit_code == 2, res.output
        assert word in res.output and "Traceback" not in res.output
    assert not (tmp_path / "a.csv").exists()


def _wall(specs, runs=3):
    from imagepiece.measure.profile import wall_forward_parts

    models = {s: _model(s) for s in specs}
    rows = wall_forward_parts(models, torch.randn(2, 3, 32, 32), runs=runs, warmup=1)
    return {s: {r.part: r for r in rows[s]} for s in specs}


def test_the_wall_clock_times_each_method_in_its_own_parts():
    parts = _wall(["tome:r=4", "evit:keep_rate=0.5", "none"])
    tome, evit, none = parts["tome:r=4"], parts["evit:keep_rate=0.5"], parts["none"]
    assert tome["matching"].ms > 0 and tome["state"].ms > 0 and tome["ranking"].ms == 0
    assert evit["ranking"].ms > 0 and evit["scores"].ms > 0 and evit["matching"].ms == 0
    assert none["block"].ms > 0 and all(none[p].ms == 0 for p in ("scores", "matching", "state"))
    assert all(r.ops is None for p in parts.values() for r in p.values())


def test_the_wall_clock_puts_the_time_where_it_was_spent(monkeypatch):
    import time

    matching = ops.bipartite_matching

    def slow(*args, **kwargs):  # 50 ms more in every ToMe matching (4 blocks), spinning: a
        end = time.perf_counter() + 0.05  # sleeping process may wait to be scheduled again
        while time.perf_counter() < end:
            pass
        return matching(*args, **kwargs)

    monkeypatch.setattr(ops, "bipartite_matching", slow)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine a woken worker thread may wait for a core
    try:
        tome = _wall(["tome:r=4"])["tome:r=4"]
    finally:
        torch.set_num_threads(threads)
    assert tome["matching"].ms >= 200
    assert max(tome[p].ms for p in ("state", "step other", "attention", "mlp", "bias")) < 50
    assert ops.bipartite_matching is slow  # restored to what it was


def test_bench_profile_on_the_wall_clock(tmp_path):
    out = tmp_path / "w.json"
    res = CliRunner().invoke(app, ["bench", *ARGS, "--method", "tome:r=4", "--profile", "--clock", "wall",
                                   "--runs", "2", "--warmup", "1", "-b", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "wall-clock" in res.output and "reduction share" in res.output
    import json

    data = json.loads(out.read_text())
    assert data["config"]["clock"] == "wall"
    rows = data["profile"]["tome:r=4"]
    assert all(r["ops"] is None for r in rows) and any(r["part"] == "matching" and r["ms"] > 0 for r in rows)
    for extra, word in ((["--clock", "wall"], "--profile only"), (["--profile", "--clock", "cpu"], "'cpu'")):
        res = CliRunner().invoke(app, ["bench", *ARGS, *extra])
        assert res.exit_code == 2 and word in res.output and "Traceback" not in res.output, res.output


def test_the_wall_clock_counts_a_part_run_inside_another_once(monkeypatch):
    import time

    select, merge_state = ops.prune_select, runtime._merge_state

    def slow_select(*args, **kwargs):  # 50 ms, spinning
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass
        return select(*args, **kwargs)

    def state_that_ranks(*args, **kwargs):  # a labelled part (ranking) inside another (state)
        ops.prune_select(torch.rand(1, 4), 0, 2)
        return merge_state(*args, **kwargs)

    monkeypatch.setattr(ops, "prune_select", slow_select)
    monkeypatch.setattr(runtime, "_merge_state", state_that_ranks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tome = _wall(["tome:r=4"])["tome:r=4"]
    finally:
        torch.set_num_threads(threads)
    assert tome["state"].ms >= 200 and tome["ranking"].ms == 0
