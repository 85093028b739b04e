"""The study's cache: one JSON file per finished step under ``results/fashion_mnist/<config>/``,
each holding the *key* of what produced it (a hash of the step's full configuration). A step is
done when its file exists with the current key; a changed configuration makes it stale. Every
file is written atomically (``imagepiece.checkpoint.atomic_write``), so a study killed at any
moment leaves finished files complete and nothing half-written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from typing import Any

from imagepiece.checkpoint import atomic_write
from imagepiece.options import json_safe


def key_of(obj: Any) -> str:
    """A short, stable hash of a JSON-able description."""
    text = json.dumps(json_safe(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_json(path: str) -> Any | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(obj), f, indent=2, default=str, allow_nan=False)
            f.write("\n")

    atomic_write(path, write)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})

    atomic_write(path, write)


def cached(path: str, key: str) -> dict[str, Any] | None:
    """The payload of a finished step, or None when missing, unreadable or stale."""
    found = read_json(path)
    return found if isinstance(found, dict) and found.get("key") == key else None


def status(path: str, key: str) -> str:
    found = read_json(path)
    if not isinstance(found, dict):
        return "todo"
    return "done" if found.get("key") == key else "stale"


class Layout:
    """Where things go: results with each run's best weights (committed), and the training run
    folders (checkpoints with optimizer state, for continuing killed runs; ignored by git)."""

    def __init__(self, out: str, runs: str):
        self.out = out
        self.runs = runs

    def run_dir(self, run: str) -> str:
        return os.path.join(self.runs, run)

    def run_result(self, run: str) -> str:
        return os.path.join(self.out, "runs", f"{run}.json")

    def run_config(self, run: str) -> str:
        return os.path.join(self.out, "configs", f"{run}.yaml")

    def weights(self, run: str) -> str:
        """The run's best weights (by validation top-1), kept with the results so evaluations,
        fine-tunes and the export work on another machine than the one that trained them."""
        return os.path.join(self.out, "weights", f"{run}.safetensors")

    def partial(self, run: str) -> str:
        """A copy of an unfinished run's folder (log, config, last and best checkpoints) kept with
        the results, so the next session on a fresh clone continues it (``--save-partial``)."""
        return os.path.join(self.out, "partial", run)

    def evaluation(self, run: str, spec_slug: str) -> str:
        return os.path.join(self.out, "evals", f"{run}__{spec_slug}.json")

    def file(self, name: str) -> str:
        return os.path.join(self.out, name)
