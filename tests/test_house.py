"""The house (issue 22, item 19): layers only call downwards, each shared helper has one home
and is imported from it, and the tools agree on one device check."""

import ast
import pathlib

import pytest
import torch

from imagepiece import bench
from imagepiece.distributed import DeviceError, check_device

ROOT = pathlib.Path(__file__).parents[1]
SRC = ROOT / "src" / "imagepiece"

#: Layers, bottom up; a module may import its own layer and those below (tools: the rest).
#: ``versions`` (the supported-version table) imports nothing of ours; ``__main__`` runs the CLI.
LAYERS = {"versions": 0, "ops": 0, "plan": 1, "runtime": 2, "patch": 3, "measure": 4, "cli": 6, "__main__": 7}
TOOL = 5


def _module(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(imported imagepiece module, names) of every import in ``path``, top level or not."""
    pkg = _module(path).split(".")[:-1]  # the package the file is in (its own, for __init__)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1] if node.level > 1 else pkg
                mod = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            elif (node.module or "").startswith("imagepiece"):
                mod = node.module.removeprefix("imagepiece").strip(".")
            else:
                continue
            out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("imagepiece").strip("."), []) for a in node.names
                    if a.name.startswith("imagepiece")]
    return out


def _layer(module: str) -> int:
    return LAYERS.get(module.split(".")[0], TOOL)


def _sources():
    return [p for p in sorted(SRC.rglob("*.py")) if p.name != "__init__.py" or p.parent != SRC]


def test_layers_only_call_downwards():
    bad = []
    for path in _sources():
        me = _module(path)
        for mod, names in _imports(path):
            targets = [f"{mod}.{n}" if mod == "" or (SRC / mod.replace(".", "/") / f"{n}.py").exists()
                       else mod for n in names] or [mod]
            for target in targets:
                target = target.strip(".")
                if target and _layer(target) > _layer(me):
                    bad.append(f"{me} imports {target}")
    assert not bad, bad


def test_shared_helpers_are_imported_from_their_home():
    """No module (tools, tests, studies) reaches a shared helper through bench, nor bench's
    privates; the measuring instruments live in imagepiece.measure."""
    shared = {"parse_method", "format_method", "use_method", "time_interleaved", "count_gmacs",
              "machine_info", "steady_allocator", "LimitViT", "knob_names"}
    bad = []
    files = [*_sources(), *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "studies").rglob("*.py"))]
    for path in files:
        if path.parent == SRC and path.name == "bench.py":
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   for a in node.names if a.name == "bench"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "bench":
                names = {a.name for a in node.names}
                wrong = names & shared | {n for n in names if n.startswith("_")}
                if wrong:
                    bad.append(f"{path.relative_to(ROOT)}: {sorted(wrong)} from bench")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and (node.attr in shared or node.attr == "_knob_names"):
                bad.append(f"{path.relative_to(ROOT)}: {node.value.id}.{node.attr}")
    assert not bad, bad
    for old in ("bench_measure.py", "bench_busy.py", "bench_backends.py"):
        assert not (SRC / old).exists()


@pytest.mark.parametrize("name", ["parse_method", "format_method", "use_method", "time_interleaved",
                                  "count_gmacs", "knob_names", "check_device", "pool_patches",
                                  "original_class", "set_grad_checkpointing"])
def test_each_helper_is_defined_once(name):
    homes = [_module(p) for p in _sources()
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.FunctionDef) and node.name == name and node.col_offset == 0]
    assert len(homes) == 1, homes


def test_one_pooling_and_one_unpatched_class_lookup():
    """Size-weighted pooling of patch tokens is runtime.pool_patches (timm's head included);
    the original class of a patched module is read in runtime only."""
    for path in _sources():
        text = path.read_text()
        if _module(path) != "runtime":
            assert "_imagepiece_original_class" not in text, path
        if _module(path) not in ("runtime", "ops"):
            assert "size_weighted_mean" not in text, path


@pytest.mark.parametrize("device", ["auto", "cpu", " CPU ", "cuda", "cuda:0", "cuda:7", "tpu",
                                    "cuda:x", "", 0])
def test_bench_and_the_other_tools_accept_the_same_devices(device):
    """One device check: bench accepts exactly what train, eval and analyze accept."""
    try:
        check_device(device, "--device")
        accepted = True
    except DeviceError as e:
        accepted, why = False, str(e)
    try:
        bench._validate(bench.BenchConfig(devices=(device,)))
        assert accepted, f"bench accepted {device!r}, the others refuse it: {why}"
    except bench.BenchError as e:
        assert not accepted, f"bench refused {device!r} ({e}), the others accept it"
        assert str(e).split("=", 1)[1] == why.split("=", 1)[1]


def test_auto_is_resolved_for_bench():
    req = bench._validate(bench.BenchConfig(devices=("auto",)))
    assert req.devices == ["cuda" if torch.cuda.is_available() else "cpu"]
