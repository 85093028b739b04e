"""``--export``: two sets of models, written into the package's model zoo with a ``models.json``
card each. The first: the baseline and the ToMe, EViT and ImagePiece fine-tunes of it at keep 0.7
(ToMe at the r matched to it). The second (``stem-*``): the paper's protocol, the coherence-stem
model trained from scratch unreduced and under each plan at keep 0.7. Seed 0 everywhere, chosen
before any result (no pick of the better seed). Each card names its set's unreduced model
(``reference``), which ``imagepiece eval`` divides images/s by.

Only run on purpose (``python studies/fashion_mnist.py --export``): it replaces the shipped
models. Each file must stay under 5 MB. The cards carry the image size; ``imagepiece.zoo`` and
``imagepiece.evaluate.evaluate_shipped`` must read it (they assumed 32 px when this was written).
"""

from __future__ import annotations

import os
from typing import Any

from imagepiece.checkpoint import save_weights

from .execute import load_run_model
from .pipeline import Study, StudyError, load_payloads
from .store import write_json

# (name, study row, the unreduced model of its set)
SHIPPED = (("baseline", "scratch/baseline", "baseline"), ("tome", "fine-tuned/tome/k07/s0", "baseline"),
           ("evit", "fine-tuned/evit/k07/s0", "baseline"),
           ("imagepiece", "fine-tuned/imagepiece/k07/s0", "baseline"),
           ("stem-baseline", "from-scratch/none/-/s0", "stem-baseline"),
           ("stem-tome", "from-scratch/tome/k07/s0", "stem-baseline"),
           ("stem-evit", "from-scratch/evit/k07/s0", "stem-baseline"),
           ("stem-imagepiece", "from-scratch/imagepiece/k07/s0", "stem-baseline"))
MAX_BYTES = 5 * 2**20


def export(study: Study, asset_dir: str) -> list[dict[str, Any]]:
    _, _, runs, rows = study.work()
    evals, speed, _ = load_payloads(study)
    by_row, by_run = {r.name: r for r in rows}, {r.name: r for r in runs}
    missing = [label for _, label, _ in SHIPPED if label not in evals]
    if missing:
        raise StudyError(f"cannot export: rows {missing} are not finished")
    cards = [dict(_write(study, name, by_row[label], by_run[by_row[label].run], evals[label], speed,
                         asset_dir), reference=reference) for name, label, reference in SHIPPED]
    write_json(os.path.join(asset_dir, "models.json"),
               {"dataset": "fashion-mnist", "img_size": study.cfg.img_size, "models": cards})
    study.log(f"exported {len(cards)} models to {asset_dir}")
    return cards


def _write(study: Study, name: str, row: Any, run: Any, ev: dict[str, Any], speed: dict[str, Any] | None,
           asset_dir: str) -> dict[str, Any]:
    path = os.path.join(asset_dir, f"fmnist_{name.replace('-', '_')}.safetensors")
    save_weights(path, load_run_model(study.ctx, run).state_dict())  # checked to fit, then written
    if os.path.getsize(path) > MAX_BYTES:
        raise StudyError(f"{path} is {os.path.getsize(path) / 2**20:.1f} MB, over the 5 MB limit")
    kwargs = dict(study.cfg.model_kwargs, img_size=study.cfg.img_size, num_classes=10)
    if run.coherence:
        kwargs["coherence"] = run.coherence
    sp = (speed or {}).get("variants", {}).get(row.name, {})
    return {"name": name, "file": os.path.basename(path), "model": run.model, "model_kwargs": kwargs,
            "method": row.spec, "test_top1": round(ev["test_top1"], 2),
            "test_top5": round(ev["test_top5"], 2),
            "speedup_cpu": round(sp["speedup"], 3) if sp else None, "gmacs": ev["gmacs"],
            "trained": row.kind, "seed": run.seed, "row": row.name,
            "config": os.path.relpath(study.ctx.layout.run_config(run.name))}
