"""What a user of the installed package meets first: the version (one source, ``--version``,
``python -m imagepiece``), the supported timm/transformers versions checked at patch time, a
readable ``model.imagepiece.trace`` and an ``eval --help`` that agrees with eval's output."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from typer.testing import CliRunner

import imagepiece
from conftest import tiny_vit
from imagepiece import data as D
from imagepiece import versions
from imagepiece.cli import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_comes_from_the_installed_metadata():
    try:
        installed = importlib.metadata.version("imagepiece")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("imagepiece is not installed (a source tree on PYTHONPATH only)")
    assert imagepiece.__version__ == installed


def test_version_option_prints_the_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    assert res.output == f"imagepiece {imagepiece.__version__}\n"


def test_python_dash_m_runs_the_cli():
    """``python -m imagepiece`` is the ``imagepiece`` script: same version line, same commands."""
    src = os.path.dirname(os.path.dirname(imagepiece.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "imagepiece", "--version"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"imagepiece {imagepiece.__version__}\n"
    run = subprocess.run([sys.executable, "-m", "imagepiece", "eval", "--help"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0 and "Usage: imagepiece eval" in run.stdout, run.stderr


def test_supported_ranges_are_those_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    path = os.path.join(ROOT, "pyproject.toml")
    if not os.path.isfile(path):
        pytest.skip("no pyproject.toml beside the tests")
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    low, high = versions.SUPPORTED["timm"]
    assert f"timm>={low},<{high}" in project["dependencies"]
    low, high = versions.SUPPORTED["transformers"]
    assert project["optional-dependencies"]["hf"] == [f"transformers>={low},<{high}"]


@pytest.mark.parametrize("installed", ["1.0.20", "2.0.0", "2.0.0rc1"])
def test_timm_outside_the_supported_range_is_named(monkeypatch, installed):
    model = tiny_vit()
    monkeypatch.setattr(timm, "__version__", installed)
    with pytest.raises(versions.UnsupportedVersionError,
                       match=rf"timm {re.escape(installed)} is installed, but imagepiece supports "
                             r"timm >= 1\.0\.23, < 2"):
        imagepiece.patch(model, "tome")
    assert not imagepiece.is_patched(model)  # nothing changed


def test_timm_inside_the_supported_range_patches(monkeypatch):
    monkeypatch.setattr(timm, "__version__", "1.9.0")
    assert imagepiece.is_patched(imagepiece.patch(tiny_vit(), "tome"))


@pytest.mark.parametrize("installed", ["4.57.0", "5.17.1", "6.0.0"])
def test_transformers_outside_the_supported_range_is_named(monkeypatch, installed):
    pytest.importorskip("transformers")
    from imagepiece.patch import hf

    transformers = hf.transformers  # the module the adapter reads the version from
    config = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=96, image_size=32, patch_size=8, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    monkeypatch.setattr(transformers, "__version__", installed)
    with pytest.raises(versions.UnsupportedVersionError,
                       match=rf"transformers {re.escape(installed)} is installed, but imagepiece "
                             r"supports transformers >= 5\.18, < 6; install a supported one"):
        imagepiece.patch(model, "tome")
    assert not imagepiece.is_patched(model)


def test_trace_repr_is_a_short_table_with_the_tensors_on_request():
    model = imagepiece.patch(tiny_vit(depth=12), "imagepiece", keep_rate=0.7)
    assert "empty" in repr(model.imagepiece.trace)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    trace = model.imagepiece.trace
    text = repr(trace)
    lines = text.splitlines()
    assert len(lines) == 2 + len(trace) == 14 and len(text) < 1500
    for line, rec in zip(lines[2:], trace, strict=True):
        low = 1 if rec.size is None else int(rec.size.min())
        high = 1 if rec.size is None else int(rec.size.max())
        assert line.split()[:3] == [str(rec.block), rec.kind, f"{rec.tokens_in}->{rec.tokens_out}"]
        assert line.split()[3] == ("1" if rec.size is None else f"{low}-{high}")
    assert [line.split()[1] for line in lines[2:]].count("prune") == 3
    full = trace.full()
    assert "tensor(" in full and len(full) > len(text)
    assert trace[3].size is not None  # the tensors themselves are still there


def test_eval_help_states_the_batch_eval_uses(tmp_path, monkeypatch):
    """The shipped models' default batch in ``eval --help`` is the one the output reports, and the
    footnote names a file that ships in the package (not one of the source tree)."""
    monkeypatch.setattr(D, "DEBIAN_FASHION_ROOT", str(tmp_path / "absent"))
    raw = CliRunner().invoke(app, ["eval", "--help"], terminal_width=200).output
    help_text = " ".join(re.sub("[│╭╮╰╯─]", " ", raw).split())  # rich's box wraps at its own width
    stated = re.search(r"default: 64; (\d+) for the shipped models", help_text)
    assert stated, help_text
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "--max-images", "8", "--json", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["batch"] == int(stated.group(1))
    assert f"batch {stated.group(1)};" in res.output
    cited = re.search(r"\((imagepiece/[\w/.-]+)\)", " ".join(res.output.split()))
    assert cited and "studies/" not in res.output
    assert os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(imagepiece.__file__)), cited.group(1)))
    res = CliRunner().invoke(app, ["eval", "-b", "0", "--max-images", "8"])
    assert res.exit_code == 2 and "batch_size=0" in res.output


def _markdown_files() -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    docs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "docs"))
            for f in fs if f.endswith(".md")]
    return [os.path.join(root, "README.md"), *sorted(docs)]


@pytest.mark.parametrize("path", _markdown_files(), ids=os.path.basename)
def test_markdown_code_blocks_are_closed(path):
    """Catches: a code fence left open, which turns every section after it into code (the
    README's study commands once swallowed its API reference, citation and license)."""
    inside, opened = False, 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                inside, opened = not inside, number
            elif inside and line.startswith("## "):
                pytest.fail(f"{path}:{number}: heading {line.strip()!r} inside the code block "
                            f"opened at line {opened}")
    assert not inside, f"{path}: the code block opened at line {opened} is never closed"
