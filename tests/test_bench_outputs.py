"""bench's output paths (issue 14, item 10): checked before any timing, one-line errors, nothing
written; --plot creates missing folders like --json and --csv."""

import errno
import json
import os

import pytest
from typer.testing import CliRunner

from imagepiece import bench, options
from imagepiece.cli import app

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg",
             "patch_size=4", "--model-arg", "embed_dim=32", "--model-arg", "depth=2",
             "--model-arg", "num_heads=2", "--method", "evit", "--batch", "2", "--threads", "1",
             "--warmup", "0", "--runs", "1", "--no-limit", "--no-busy-check"]


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def no_timing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark started although an output path is bad")

    monkeypatch.setattr(bench, "run_benchmark", refuse)


@pytest.mark.parametrize("options, words", [
    (["--json", "{tmp}"], ["--json", "is a directory"]),
    (["--csv", "{tmp}/file.txt/r.csv"], ["--csv", "file.txt", "is a file, not a folder"]),
    (["--json", "{tmp}/file.txt/a/b/r.json"], ["file.txt", "is a file, not a folder"]),
    (["--plot", "{tmp}/r.bmp"], ["--plot", "r.bmp", "'.bmp'", "allowed:", ".png", ".svg"]),
    (["--plot", "{tmp}/r"], ["--plot", "(none)", ".pdf"]),
    (["--json", "{tmp}/ro/r.json"], ["--json", "ro", "not writable"]),
    (["--plot", "{tmp}/ro/sub/r.png"], ["--plot", "ro", "not writable"]),
    (["--json", "{tmp}/r.x", "--csv", "{tmp}/r.x"], ["--json", "--csv", "both name"]),
    (["--json", "{tmp}/ok.json", "--plot", "{tmp}/p.bmp"], ["--plot", "'.bmp'"]),
])
def test_bad_output_paths_fail_first(tmp_path, monkeypatch, no_timing, options, words):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "ro").mkdir()
    real_access = os.access
    ro = str(tmp_path / "ro")  # the tests may run as root, who may write anywhere: fake the mode
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == ro else real_access(p, mode))
    before = _files(tmp_path)
    res = CliRunner().invoke(app, ["bench", *TINY_ARGS, *[o.format(tmp=tmp_path) for o in options]])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for w in words:
        assert w in lines[0]
    assert _files(tmp_path) == before and not (tmp_path / "ro" / "sub").exists()


def test_read_only_folder_for_real(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "not writable" in options.output_problem(str(ro / "r.json"), "--json")
    finally:
        ro.chmod(0o755)


def test_outputs_create_missing_folders(tmp_path):
    j, c, p = tmp_path / "a" / "r.json", tmp_path / "b" / "c" / "r.csv", tmp_path / "d" / "e" / "r.svg"
    res = CliRunner().invoke(app, ["bench", *TINY_ARGS, "--json", str(j), "--csv", str(c),
                                   "--plot", str(p)])
    assert res.exit_code == 0, res.output
    assert json.loads(j.read_text())["variants"][0]["label"] == "none"
    assert c.read_text().startswith("label,")
    assert p.read_text().lstrip().startswith("<?xml")
    assert sorted(os.listdir(p.parent)) == ["r.svg"]  # no temporary file left


def test_a_write_error_at_the_end_is_one_line(tmp_path, monkeypatch):
    def full(result, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bench, "write_json", full)
    res = CliRunner().invoke(app, ["bench", *TINY_ARGS, "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 1
    assert "error: could not write" in res.output and "No space left on device" in res.output
    assert "Traceback" not in res.output


def test_json_has_no_nan(tmp_path):
    res = bench.run_benchmark(bench.BenchConfig(
        model="vit_tiny_patch16_224", model_kwargs=dict(img_size=32, patch_size=4, embed_dim=32,
                                                        depth=2, num_heads=2),
        methods=("evit",), batch_sizes=(2,), threads=(1,), warmup=0, runs=1, limit=False,
        busy_check=False))
    res.variants[1].speedup = float("nan")
    bench.write_json(res, str(tmp_path / "r.json"))
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and json.loads(text)["variants"][1]["speedup"] is None
