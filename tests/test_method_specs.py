"""Method specs and the options around them (issue 22, items 5, 6 and 16): labels identify a
plan, options that would be ignored are refused, and every form the docs give works."""

import math

import pytest
from typer.testing import CliRunner

from imagepiece import bench
from imagepiece.cli import app
from imagepiece.plan import MethodError, format_method, make_plan, parse_method

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg",
             "patch_size=8", "--model-arg", "depth=4", "--model-arg", "embed_dim=32",
             "--model-arg", "num_heads=2"]


def _ops(spec: str, depth: int = 12):
    name, knobs = parse_method(spec)
    return make_plan(name, depth, **knobs).ops


# --------------------------------------------------------------------------------------
# Item 5: two plans never share a label
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tome:r=4;", "tome:r=4", "tome:r=4;4;", "tome:r=16;-0.5",
                                  "imagepiece:keep_rate=0.5,blocks=1;4;7", "evit:blocks=3"])
def test_format_method_reads_back_as_the_same_knobs(spec):
    name, knobs = parse_method(spec)
    assert format_method(name, knobs) == spec
    assert parse_method(format_method(name, knobs)) == (name, knobs)


def test_bench_labels_identify_plans():
    """'tome:r=4;' (block 0 only) and 'tome:r=4' (every block) are two rows with two labels."""
    cfg = bench.BenchConfig(methods=("tome:r=4;", "tome:r=4", "tome:r=4"))
    methods = bench._expand_methods(cfg, depth=12)
    assert [label for label, _, _ in methods] == ["none", "tome:r=4;", "tome:r=4"]
    plans = {label: make_plan(name, 12, **kn).ops for label, name, kn in methods}
    assert plans["tome:r=4;"] != plans["tome:r=4"]
    assert sum(op is not None for op in plans["tome:r=4;"]) == 1


# --------------------------------------------------------------------------------------
# Item 6: options that do not apply are errors, not ignored
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("methods, sweep, word", [
    (("tome",), dict(keep_rates=(0.5,)), "--keep-rate"),
    (("evit",), dict(rs=(5,)), "--r"),
    (("evit:keep_rate=0.6",), dict(keep_rates=(0.5,)), "--keep-rate"),  # fixed by the spec
])
def test_bench_sweep_that_applies_to_no_method_is_refused(methods, sweep, word):
    with pytest.raises(bench.BenchError, match=f"{word} .* applies to no method"):
        bench._validate(bench.BenchConfig(methods=methods, **sweep))


def test_bench_sweep_that_applies_somewhere_is_accepted():
    bench._validate(bench.BenchConfig(keep_rates=(0.5,)))  # default methods: evit, imagepiece, ...
    bench._validate(bench.BenchConfig(methods=("tome", "evit"), rs=(3,), keep_rates=(0.5,)))


def test_knob_given_twice_is_refused():
    with pytest.raises(MethodError, match="'keep_rate' is given twice"):
        parse_method("evit:keep_rate=0.5,keep_rate=0.9")


@pytest.mark.parametrize("args, word", [
    (["--method", "tome", "--keep-rate", "0.5"], "--keep-rate"),
    (["--method", "evit", "--r", "5"], "--r"),
    (["--method", "evit:keep_rate=0.5,keep_rate=0.9"], "given twice"),
])
def test_cli_bench_refuses_options_that_do_not_apply(args, word):
    res = CliRunner().invoke(app, ["bench", *TINY_ARGS, *args])
    assert res.exit_code == 2 and word in res.output, res.output
    assert "Traceback" not in res.output and "img/s" not in res.output


@pytest.mark.parametrize("args, word", [
    (["masking", "--fill", "nan"], "fill=nan"),
    (["masking", "--fill", "inf"], "fill=inf"),
    (["masking", "--fill", "-inf"], "fill=-inf"),
])
def test_cli_analyze_refuses_a_fill_that_is_not_finite(tmp_path, args, word):
    res = CliRunner().invoke(app, ["analyze", *TINY_ARGS, "--out", str(tmp_path / "a"), *args])
    assert res.exit_code == 2 and word in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "a").exists()


def test_analysis_refuses_an_unknown_split():
    from imagepiece.analysis import AnalysisError, build_data, check_fill

    with pytest.raises(AnalysisError, match="split='foo'.*allowed: train, val, test"):
        build_data("synthetic", "foo")
    assert len(build_data("synthetic", "test", length=3)) == 3
    with pytest.raises(AnalysisError, match="fill=nan"):
        check_fill(math.nan)


def test_cli_analyze_refuses_an_unknown_split(tmp_path):
    res = CliRunner().invoke(app, ["analyze", *TINY_ARGS, "--split", "foo", "--length", "2",
                                   "--out", str(tmp_path / "a"), "masking", "--counts", "0"])
    assert res.exit_code == 2 and "split='foo'" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------------
# Item 16: every form the docs name works, and the errors help
# --------------------------------------------------------------------------------------


def test_a_single_block_is_a_block():
    ops = _ops("evit:blocks=3")
    assert [i for i, op in enumerate(ops) if op is not None] == [3]
    assert _ops("imagepiece:blocks=6,retokenize_blocks=4")[4] is not None


def test_a_per_block_r_list_can_be_written():
    ops = _ops("tome:r=4;4;")
    assert [op.r if op else 0 for op in ops] == [4, 4] + [0] * 10
    with pytest.raises(ValueError, match="tome:r=4;4;"):  # (r, inflection): the error shows the list form
        _ops("tome:r=4;4")
    assert _ops("tome:r=16;-0.5") == make_plan("tome", 12, r=(16, -0.5)).ops


def test_fuse_is_fixed_by_the_imagepiece_presets():
    with pytest.raises(TypeError, match=r"unexpected knobs \['fuse'\].*'imagepiece-discard'"):
        _ops("imagepiece-discard:fuse=True")
    with pytest.raises(TypeError, match=r"unexpected knobs \['fuse'\].*'imagepiece-discard'"):
        _ops("imagepiece:fuse=False")
    assert make_plan("imagepiece-discard").name == "imagepiece-discard"
    assert not any(getattr(op, "fuse", False) for op in make_plan("imagepiece-discard").ops)


def test_allowed_knobs_list_every_knob_make_plan_accepts():
    """EViT's fuse is a knob: it is accepted and it is listed."""
    with pytest.raises(TypeError, match="allowed: .*'fuse'"):
        make_plan("evit", 12, fusee=False)
    assert make_plan("evit", 12, fuse=False).ops[3].fuse is False


def test_nonsemantic_share_is_a_knob_of_imagepiece():
    plan = make_plan(*parse_method("imagepiece:nonsemantic_share=0.3")[:1], 12,
                     **parse_method("imagepiece:nonsemantic_share=0.3")[1])
    step = plan.resolve(12, 197, 1)[2]
    assert step.kind == "retokenize" and step.m == round(0.3 * 196)
    assert step.m != make_plan("imagepiece").resolve(12, 197, 1)[2].m
