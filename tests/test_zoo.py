"""The models shipped inside the package, and the offline defaults of eval and visualize."""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from imagepiece import data as D
from imagepiece import is_patched, zoo
from imagepiece.cli import app
from imagepiece.data import DataError, FashionMNIST, build_dataset
from imagepiece.evaluate import evaluate_model, make_eval_loader

NAMES = ("baseline", "tome", "evit", "imagepiece",
         "stem-baseline", "stem-tome", "stem-evit", "stem-imagepiece")


def test_every_method_ships_small_with_its_card():
    models = zoo.shipped_models()
    assert tuple(models) == NAMES
    for m in models.values():
        assert os.path.getsize(m.path) <= 5 * 2**20
        assert 0 < m.card["test_top1"] <= 100 and os.path.isfile(os.path.join(
            os.path.dirname(__file__), "..", m.card["config"]))


def test_shipped_models_are_trained_and_match_their_cards():
    # 1,000 test images from the copy shipped in the package: works with no Debian folder.
    cards = zoo.shipped_models()
    ds = build_dataset("fashion-mnist", D.PACKAGED_FASHION_ROOT, "test", zoo.shared_img_size(cards),
                       train_transform=False)
    loader = make_eval_loader(torch.utils.data.Subset(ds, range(1000)), 250)
    for name, card in cards.items():
        model = zoo.load_shipped(name)
        plan = model.imagepiece.plan.name if is_patched(model) else "none"
        assert plan == card.method.split(":")[0]
        top1 = evaluate_model(model, loader)["top1"]
        # Trained weights (chance is 10%), close to the full-test-split number on the card
        # (binomial standard error on 1,000 images is about 1 point).
        assert top1 > 60 and abs(top1 - card.card["test_top1"]) < 4, (name, top1)


def test_unknown_or_missing_shipped_model(tmp_path, monkeypatch):
    with pytest.raises(zoo.ZooError, match="unknown shipped model 'nope'; allowed: baseline"):
        zoo.load_shipped("nope")
    with pytest.raises(zoo.ZooError, match="models.json' is missing"):
        zoo.shipped_models(str(tmp_path))
    (tmp_path / "models.json").write_text("{not json")
    with pytest.raises(zoo.ZooError, match="unreadable"):
        zoo.shipped_models(str(tmp_path))
    card = dict(name="a", file="a.safetensors", model="vit_tiny_patch16_224", model_kwargs={}, method="none",
                reference="gone")
    (tmp_path / "models.json").write_text(json.dumps({"models": [card]}))
    with pytest.raises(zoo.ZooError, match=r"unknown reference model\(s\) \['gone'\]"):
        zoo.shipped_models(str(tmp_path))


def test_default_fashion_root_falls_back_to_the_packaged_test_split(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_ROOT", str(tmp_path / "absent"))
    assert D.default_fashion_root("test") == D.PACKAGED_FASHION_ROOT
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        D.default_fashion_root("train")
    assert len(FashionMNIST(D.default_fashion_root("test"), "test")) == 10000


def test_eval_with_no_model_evaluates_the_shipped_models(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_ROOT", str(tmp_path / "absent"))  # offline, no Debian files
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "--max-images", "256", "--json", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "shipped with imagepiece" in res.output and "imagepiece" in res.output
    result = json.loads(out.read_text())
    assert result["images"] == 256 and [r["model"] for r in result["results"]] == list(NAMES)
    rows = {r["model"]: r for r in result["results"]}
    # Each set's speed-ups divide by its own unreduced model, trained the same way.
    assert rows["baseline"]["speedup"] == rows["stem-baseline"]["speedup"] == 1.0
    for name in NAMES:
        ref = "stem-baseline" if name.startswith("stem-") else "baseline"
        assert rows[name]["reference"] == ref
        assert rows[name]["speedup"] == pytest.approx(rows[name]["images_per_s"] / rows[ref]["images_per_s"])
        if name != ref:
            assert rows[name]["gmacs"] < rows[ref]["gmacs"]  # every plan cuts compute
    assert "over stem-baseline for stem-baseline, stem-tome" in " ".join(res.output.split())


def test_the_stem_set_is_trained_from_scratch_with_the_stem_and_beats_the_plain_baseline():
    """The paper's protocol shipped: coherence stem, trained from scratch, seed 0; each reduced stem
    model is cheaper than the plain shipped baseline and more accurate on its card."""
    models = zoo.shipped_models()
    for name in NAMES[4:]:
        m = models[name]
        assert m.model_kwargs["coherence"] == "stem" and m.card["trained"] == "from-scratch"
        assert m.card["seed"] == 0 and m.reference == "stem-baseline"
        if name != "stem-baseline":
            assert m.card["gmacs"] < models["baseline"].card["gmacs"]
            assert m.card["test_top1"] > models["baseline"].card["test_top1"]


def test_visualize_with_no_model_uses_the_shipped_imagepiece(tmp_path):
    res = CliRunner().invoke(app, ["visualize", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 5 and "contact_sheet.png" in pngs
    assert len(list((tmp_path / "inputs").glob("*.png"))) == 4
    res = CliRunner().invoke(app, ["visualize", "--model", "vit_tiny_patch16_224", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no image given" in res.output


def test_input_size_comes_from_the_card():
    """The next study's models are 28 px: the size is read from each card, never assumed."""
    from imagepiece.zoo import ShippedModel, ZooError, shared_img_size

    def card(name, size):
        return ShippedModel(name, f"{name}.safetensors", "vit_tiny_patch16_224", {"img_size": size},
                            "none", {})

    assert shared_img_size({"a": card("a", 28), "b": card("b", 28)}) == 28
    assert shared_img_size(zoo.shipped_models()) == 28
    with pytest.raises(ZooError, match="disagree"):
        shared_img_size({"a": card("a", 28), "b": card("b", 32)})
