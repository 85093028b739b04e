"""``imagepiece tune`` and what it stands on: each model's own preprocessing, the Pareto front and
target picking (on fake tables), the knob search on GMACs (deterministic), method specs in
``patch``, ToMe's ``model.r`` idiom, the command's errors and a tiny end-to-end run.

Nothing here asserts on speed: timing is only checked to have produced numbers.
"""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

import imagepiece
from conftest import tiny_vit
from imagepiece.cli import app
from imagepiece.plan import make_plan
from imagepiece.preprocess import PreprocessError, from_transformers_folder, resolve_preprocessing
from imagepiece.tune import (
    TuneError,
    TuneOptions,
    TuneRow,
    _Gmacs,
    candidate_knobs,
    knob_for_gmacs,
    pareto,
    pick,
    plan_at_compute,
    tune,
)

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def small_vit(**kw):
    return tiny_vit(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10, **kw)


# --------------------------------------------------------------------------------------
# Pareto front and target picking, on fake tables
# --------------------------------------------------------------------------------------


def row(method, speedup, top1, preset=None):
    return TuneRow(method, preset or method.split(":")[0], None, None, 1.0, 1.0, top1=top1, top1_se=0.1,
                   images=100, images_per_s=100 * speedup, speedup=speedup)


def fake_table():
    return [row("none", 1.0, 80.0), row("evit:keep_rate=0.7", 1.3, 79.5), row("tome:r=4", 1.25, 79.0),
            row("evit:keep_rate=0.5", 1.8, 77.0), row("tome:r=8", 1.7, 77.5),
            row("imagepiece:keep_rate=0.5", 1.8, 77.6)]


def test_pareto_marks_exactly_the_undominated_rows():
    rows = fake_table()
    front = pareto(rows)
    assert [r.method for r in front] == ["none", "evit:keep_rate=0.7", "imagepiece:keep_rate=0.5"]
    # tome:r=4 is beaten by evit 0.7 on both axes; evit 0.5 ties imagepiece on speed, loses on top-1
    assert not any(r.pareto for r in rows if r.method in ("tome:r=4", "evit:keep_rate=0.5", "tome:r=8"))
    unmeasured = row("tome:r=12", 2.5, None)
    unmeasured.top1 = None
    assert unmeasured not in pareto([*rows, unmeasured]) and not unmeasured.pareto


def test_pick_target_speedup_is_the_most_accurate_fast_enough_plan():
    chosen, rule = pick(fake_table(), target_speedup=1.5)
    assert chosen.method == "imagepiece:keep_rate=0.5" and "most accurate" in rule
    chosen, _ = pick(fake_table(), target_speedup=1.2)
    assert chosen.method == "none" or chosen.method == "evit:keep_rate=0.7"
    assert chosen.method == "evit:keep_rate=0.7"  # the unmodified model is not 1.2x
    assert pick(fake_table(), target_speedup=3.0)[0] is None
    assert "no measured plan" in pick(fake_table(), target_speedup=3.0)[1]


def test_pick_max_drop_is_the_fastest_plan_within_the_drop():
    chosen, rule = pick(fake_table(), max_drop=1.0)
    assert chosen.method == "evit:keep_rate=0.7" and "fastest" in rule
    chosen, _ = pick(fake_table(), max_drop=2.5)
    assert chosen.method == "imagepiece:keep_rate=0.5"  # 1.8x ties evit 0.5: the more accurate wins
    chosen, _ = pick(fake_table(), target_speedup=1.6, max_drop=2.45)
    assert chosen.method == "imagepiece:keep_rate=0.5"
    assert pick(fake_table()) == (None, None)
    line = chosen.python_line()
    assert line == 'imagepiece.patch(model, "imagepiece:keep_rate=0.5")' and chosen.cli_spec().endswith(
        "imagepiece:keep_rate=0.5")


# --------------------------------------------------------------------------------------
# Knob search on GMACs
# --------------------------------------------------------------------------------------


def test_knob_for_gmacs_is_the_mildest_value_that_reaches_the_target():
    model = small_vit()
    counter = _Gmacs(model)
    value, red = knob_for_gmacs(counter, "evit", 1.6)
    assert red >= 1.6 and counter.reduction("evit", {"keep_rate": round(value + 0.01, 2)}) < 1.6
    r, red = knob_for_gmacs(counter, "tome", 1.5)
    assert red >= 1.5 and counter.reduction("tome", {"r": r - 1}) < 1.5
    assert knob_for_gmacs(counter, "evit", 50.0) is None
    assert not imagepiece.is_patched(model)  # the caller's model is left alone


def test_plan_at_compute_gives_the_spec_and_knob_without_a_sweep():
    model = small_vit()
    spec, value, red = plan_at_compute(model, "evit", 2.0)
    assert spec == f"evit:keep_rate={value}" and 2.0 <= red < 2.3
    patched = imagepiece.patch(small_vit(), spec)
    assert patched.imagepiece.plan.keep_rate == value
    with pytest.raises(TuneError, match="at most"):
        plan_at_compute(model, "evit", 50)
    with pytest.raises(TuneError, match="no keep_rate or r knob"):
        plan_at_compute(model, "none", 2)


def test_candidate_knobs_cover_mild_to_strongest_in_order():
    counter = _Gmacs(small_vit())
    found = candidate_knobs(counter, "imagepiece", points=4)
    reductions = [red for _, red in found]
    assert len(found) == 4 and reductions == sorted(reductions)
    assert 1.2 <= reductions[0] < 1.35 and reductions[-1] > 2.5
    assert [v for v, _ in found] == sorted((v for v, _ in found), reverse=True)  # keep rates fall


# --------------------------------------------------------------------------------------
# Method specs in patch, model.r
# --------------------------------------------------------------------------------------


def test_patch_and_plan_accept_the_cli_spec_strings():
    n = small_vit().patch_embed.num_patches + 1
    model = imagepiece.patch(small_vit(), "tome:r=8")
    assert model.imagepiece.token_counts(n) == [(s.tokens_in, s.tokens_out) for s in
                                                make_plan("tome", 4, r=8).resolve(4, n, 1)]
    model.imagepiece.plan = "imagepiece:keep_rate=0.5,size_norm=true"
    assert model.imagepiece.plan.keep_rate == 0.5 and model.imagepiece.plan.name == "imagepiece"
    imagepiece.patch(model, "evit:keep_rate=0.6", blocks=(1, 2))
    assert model.imagepiece.plan == make_plan("evit", 4, keep_rate=0.6, blocks=(1, 2))
    with pytest.raises(ValueError, match="given both"):
        imagepiece.patch(model, "tome:r=8", r=4)
    with pytest.raises(ValueError, match="unknown method"):
        model.imagepiece.plan = "tomee:r=8"


def test_model_r_sets_tomes_r_and_refuses_plans_without_one():
    n = 65
    model = imagepiece.patch(small_vit(), "tome", r=16)
    assert model.r == 16
    model.r = 4
    assert model.r == 4 and model.imagepiece.token_counts(n)[0] == (65, 61)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), imagepiece.patch(small_vit(), "tome", r=4)(x))
    imagepiece.patch(model, "tome:r=2;-0.5")
    model.r = 3  # replaces the whole (r, inflection) schedule, other knobs stay
    assert model.imagepiece.plan == make_plan("tome", 4, r=3)
    imagepiece.patch(model, "evit")
    assert model.r is None
    with pytest.raises(AttributeError, match="model.imagepiece.plan"):
        model.r = 4


# --------------------------------------------------------------------------------------
# Each model's own preprocessing
# --------------------------------------------------------------------------------------


def test_timm_preprocessing_comes_from_pretrained_cfg_at_the_models_size():
    prep = resolve_preprocessing(small_vit())  # an augreg ViT: mean and std 0.5
    assert prep.mean == (0.5, 0.5, 0.5) and prep.std == (0.5, 0.5, 0.5) and prep.img_size == 32
    assert prep.crop_pct == 0.9 and prep.interpolation == "bicubic" and "pretrained_cfg" in prep.source
    deit_model = tiny_vit(name="deit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)
    deit = resolve_preprocessing(deit_model)  # DeiT: ImageNet's mean, its own crop (0.9 in timm 1.0.31)
    assert deit.mean == IMAGENET["mean"] and deit.crop_pct == deit_model.pretrained_cfg["crop_pct"]
    forced = resolve_preprocessing(small_vit(), crop_pct=1.0, mean=[0.1], interpolation="bilinear")
    assert forced.mean == (0.1, 0.1, 0.1) and forced.crop_pct == 1.0 and "overridden" in forced.source
    for bad in (dict(std=[0, 1, 1]), dict(mean=[1, 2]), dict(crop_pct=1.5), dict(interpolation="cubic"),
                dict(img_size=0)):
        with pytest.raises(PreprocessError, match="not allowed"):
            resolve_preprocessing(small_vit(), **bad)


def test_shipped_model_preprocessing_is_its_cards():
    from imagepiece.data import FASHION_MEAN, FASHION_STD
    from imagepiece.zoo import load_shipped

    prep = resolve_preprocessing(load_shipped("baseline", patched=False), source="card")
    assert (prep.mean, prep.std, prep.img_size, prep.crop_pct) == (FASHION_MEAN, FASHION_STD, 28, 1.0)


def test_transformers_folder_preprocessing_is_its_preprocessor_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                 patch_size=8, intermediate_size=64, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    assert "no preprocessor_config.json" in from_transformers_folder(str(tmp_path), model).source
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(
        do_normalize=True, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2,
        size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 32, "width": 32})))
    prep = resolve_preprocessing(model, str(tmp_path))
    assert prep.mean == (0.5, 0.4, 0.3) and prep.std == (0.2, 0.25, 0.3)
    assert prep.interpolation == "bilinear" and prep.crop_pct == 0.8 and prep.img_size == 32
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(do_normalize=False, resample=3,
                                                                      size={"height": 32, "width": 32})))
    prep = resolve_preprocessing(model, str(tmp_path))
    assert (prep.mean, prep.std) == ((0.0,) * 3, (1.0,) * 3)
    assert (prep.crop_pct, prep.interpolation) == (1.0, "bicubic")


def test_forcing_the_wrong_normalisation_changes_the_accuracy():
    """The shipped model was trained with Fashion-MNIST's mean/std; ImageNet's lowers top-1."""
    from imagepiece.evaluate import evaluate_model, make_eval_loader
    from imagepiece.tune import load_data
    from imagepiece.zoo import load_shipped

    model = load_shipped("baseline", patched=False)
    top1 = {}
    for name, forced in (("own", {}), ("imagenet", IMAGENET)):
        prep = resolve_preprocessing(model, **forced)
        ds = load_data("fashion-mnist", None, "test", prep, 300, 10)
        top1[name] = evaluate_model(model, make_eval_loader(ds, 100))["top1"]
    assert top1["own"] > 80 and top1["imagenet"] < top1["own"] - 5


# --------------------------------------------------------------------------------------
# The sweep, the command and its errors
# --------------------------------------------------------------------------------------


def _loader(n=32):
    from imagepiece.data import build_dataset
    from imagepiece.evaluate import make_eval_loader

    return make_eval_loader(build_dataset("synthetic", None, "val", 32, train_transform=False, length=n), 16)


FAST = TuneOptions(batch_size=8, runs=1, warmup=0, points=2, refine=1)


def test_tune_measures_every_row_and_ctrl_c_keeps_what_was_measured():
    result = tune(small_vit(), _loader(), ["evit", "tome:r=4"], FAST, target_speedup=0.01)
    methods = [r.method for r in result.rows]
    assert methods[0] == "none" and "tome:r=4" in methods and sum(m.startswith("evit") for m in methods) >= 2
    assert all(r.top1 is not None and r.images == 32 and r.speedup is not None for r in result.rows)
    assert result.chosen is not None and result.chosen.pareto and not result.interrupted
    calls = []

    def stop(done, total, what):
        calls.append(what)
        if what.startswith("top-1") and len(calls) > 4:
            raise KeyboardInterrupt

    cut = tune(small_vit(), _loader(), ["evit"], FAST, progress=stop)
    assert cut.interrupted and any(r.top1 is not None for r in cut.rows)
    assert any(r.top1 is None for r in cut.rows)


def _run(args):
    return CliRunner().invoke(app, ["tune", *args])


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_model"], "unknown model"),
    (["--model", "shipped:nope"], "unknown shipped model"),
    (["--device", "tpu"], "device='tpu'; allowed"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--backend", "tensorrt"], "unknown backend"),
    (["--dataset", "cifar"], "dataset='cifar' is not allowed"),
    (["--method", "tomee"], "unknown method"),
    (["--batch-size", "0"], "batch_size=0 is not allowed"),
    (["--mean", "0.5,0.5"], "mean="),
    (["--crop-pct", "2"], "crop_pct=2.0 is not allowed"),
    (["--target-speedup", "-1"], "target_speedup=-1.0"),
    (["--max-images", "0"], "max_images=0"),
    (["--runs", "0"], "runs=0"),
])
def test_cli_errors_are_one_line_and_write_nothing(args, message, tmp_path):
    out = tmp_path / "t.csv"
    res = _run([*args, "--csv", str(out), "--max-images", "8"] if "--max-images" not in args else [*args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_cli_refuses_a_model_whose_classes_are_not_the_datas(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (28, 28)).save(tmp_path / "val" / cls / "a.png")
    res = _run(["--dataset", "imagefolder", "--data", str(tmp_path), "--split", "val"])
    assert res.exit_code == 2 and "10 outputs but the data has 2 classes" in res.output


def test_cli_tune_on_the_shipped_model_writes_table_csv_json_plot(tmp_path):
    paths = [tmp_path / "out" / f"t.{ext}" for ext in ("csv", "json", "png")]
    res = _run(["--max-images", "64", "--runs", "1", "--points", "2", "--refine", "0", "--batch-size", "32",
                "--method", "evit", "--target-speedup", "0.01", "--csv", str(paths[0]),
                "--json", str(paths[1]), "--plot", str(paths[2])])
    assert res.exit_code == 0, res.output
    assert "Fashion" in res.output or "0.286" in res.output  # the card's preprocessing is stated
    rows = list(csv.DictReader(paths[0].open()))
    assert rows[0]["method"] == "none" and len(rows) == 3 and all(r["top1"] for r in rows)
    data = json.loads(paths[1].read_text())
    chosen = data["chosen"]["method"]  # the most accurate row: which one depends on the data only
    assert chosen in [r["method"] for r in rows] and f'imagepiece.patch(model, "{chosen}")' in res.output
    assert data["setup"]["images"] == 64 and data["chosen"]["top1"] == max(float(r["top1"]) for r in rows)
    assert paths[2].stat().st_size > 1000


def test_cli_tune_dry_run_on_synthetic_data_with_a_timm_name(tmp_path):
    args = ["--model", "vit_tiny_patch16_224"]
    for kv in ("img_size=32", "patch_size=4", "embed_dim=32", "depth=4", "num_heads=2", "num_classes=5"):
        args += ["--model-arg", kv]
    res = _run([*args, "--dataset", "synthetic", "--max-images", "16", "--runs", "1", "--points", "1",
                "--refine", "0", "--method", "tome", "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "t.json").read_text())
    assert [r["preset"] for r in data["rows"]] == ["none", "tome"]
    assert "mean (0.5" in data["setup"]["preprocessing"]


def test_cli_tune_on_a_transformers_folder_and_the_printed_line_applies_the_plan(tmp_path):
    """The README's second example: a transformers folder on an image folder, with the chosen
    plan's Python line pasted as printed."""
    import re

    from PIL import Image

    T = pytest.importorskip("transformers")
    T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                            image_size=32, patch_size=4, intermediate_size=64,
                                            num_labels=2)).save_pretrained(tmp_path / "vit")
    for c, colour in (("cat", (200, 20, 20)), ("dog", (20, 20, 200))):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), colour).save(tmp_path / "val" / c / f"{i}.png")
    plot = tmp_path / "t.png"
    res = _run(["--model", str(tmp_path / "vit"), "--dataset", "imagefolder", "--data", str(tmp_path),
                "--split", "val", "--max-images", "6", "--runs", "1", "--points", "2", "--refine", "0",
                "--method", "tome", "--max-drop", "100", "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    assert "no preprocessor_config.json" in res.output and plot.stat().st_size > 1000
    line = re.search(r'imagepiece\.patch\(model, "[^"]+"\)', res.output).group(0)
    model = T.ViTForImageClassification.from_pretrained(tmp_path / "vit")
    exec(line, {"imagepiece": imagepiece, "model": model})
    spec = line.split('"')[1]  # which row wins depends on the measured speeds: any row's line must work
    assert spec == "none" or spec.startswith("tome:r=")
    assert model.imagepiece.plan == imagepiece.patch(T.ViTForImageClassification.from_pretrained(
        tmp_path / "vit"), spec).imagepiece.plan
