"""The Fashion-MNIST study: ToMe, EViT and ImagePiece compared at matched compute on a ViT trained
from scratch, with controls, tuning on the validation split and the paper's claims one by one.

    python studies/fashion_mnist.py --plan                      # every step, its cost, what is done
    python studies/fashion_mnist.py                             # the whole cpu study (~4 h, 2 cores)
    python studies/fashion_mnist.py --max-minutes 110           # a piece; repeat until "done"
    python studies/fashion_mnist.py --stage baseline --stage checks   # some stages only
    python studies/fashion_mnist.py --only 'fine-tuned/evit/k07/s1'   # re-run one row (glob ok)
    python studies/fashion_mnist.py --report                    # tables and plots from the cache
    python studies/fashion_mnist.py --config gpu                # 12 blocks, 192 wide, 56 px, on CUDA
    python studies/fashion_mnist.py --export                    # ship the models (replaces assets!)
    python studies/fashion_mnist.py --save-partial              # keep unfinished runs with the results
    python studies/fashion_mnist.py --stage stem --threads 1 &  # two calls side by side, 1 thread each,
    python studies/fashion_mnist.py --stage checks --threads 1  # on different stages (never while timing)

Every finished step is cached under ``results/fashion_mnist/<config>/`` with the key of its
configuration, so re-running skips it; an interrupted training run continues from its last
epoch (``runs/fashion_mnist/<config>/``, git-ignored; ``--save-partial`` copies unfinished runs into
``results/.../partial/`` for the next clone, which continues them); a changed configuration
re-runs what it affects.
See docs/study.md for the design.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fmnist_study.config import CONFIGS  # noqa: E402
from fmnist_study.pipeline import Study, StudyError  # noqa: E402
from fmnist_study.registry import STAGES  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="folder of the IDX files")
    p.add_argument("--out", default=None, help="results folder (default results/fashion_mnist/CONFIG)")
    p.add_argument("--runs", default=None, help="training run folders (default runs/fashion_mnist/CONFIG)")
    p.add_argument("--plan", "--dry-run", action="store_true", help="print every step, its estimated "
                   "minutes and status, and the pieces; run nothing")
    p.add_argument("--stage", action="append", choices=[s for s in STAGES if s != "report"],
                   help="only these stages (repeatable)")
    p.add_argument("--only", action="append", metavar="PATTERN", help="run only the rows, runs or steps "
                   "matching this glob (e.g. 'fine-tuned/evit/*', speed, 'analysis:*'), even if done: an "
                   "unfinished training run continues from its checkpoint, a finished one is not retrained "
                   "(add --fresh to retrain)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop before a step that would end "
                   "after this many minutes (estimated); run again to continue")
    p.add_argument("--piece-minutes", type=float, default=110, help="session length for --plan's pieces")
    p.add_argument("--fresh", action="store_true", help="redo the selected steps even when done")
    p.add_argument("--ignore-checks", action="store_true", help="go on when the baseline or the EViT "
                   "fine-tune misses its target (a configuration records the failed checks it accepts)")
    p.add_argument("--report", action="store_true", help="only rewrite the report from the cache")
    p.add_argument("--export", action="store_true", help="write the shipped models into the package")
    p.add_argument("--save-partial", action="store_true", help="copy every unfinished training run into "
                   "the results (partial/), to be committed: a fresh clone continues them (stop the runs "
                   "first)")
    p.add_argument("--asset-dir", default=None, help="where --export writes (default: the package's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this call (default: the "
                   "config's); e.g. 1 each for two calls side by side on different --stage lists")
    return p.parse_args(argv)


def make_study(a: argparse.Namespace) -> Study:
    out = a.out or os.path.join("results", "fashion_mnist", a.config)
    runs = a.runs or os.path.join("runs", "fashion_mnist", a.config)
    cfg = CONFIGS[a.config]
    if a.threads is not None:
        if a.threads < 1:
            raise StudyError(f"--threads {a.threads}: must be 1 or more")
        cfg = dataclasses.replace(cfg, threads=a.threads, bench_threads=cfg.timing_threads)
    return Study(cfg, a.data, out, runs, progress=not a.quiet)


def main(argv: list[str] | None = None) -> str:
    from fmnist_study.plan import estimator, plan_lines
    from fmnist_study.publish import write_report

    a = parse(argv)
    if a.fresh and not (a.stage or a.only):
        raise StudyError("--fresh redoes finished steps: name them with --stage or --only")
    study = make_study(a)
    if a.plan:
        print("\n".join(plan_lines(study, a.max_minutes or a.piece_minutes)))
        return "plan"
    if a.save_partial:
        saved = study.save_partial()
        print("\n".join(f"saved {run}: {n} epochs" for run, n in saved) or "no unfinished run to save")
        return "saved"
    if a.export:
        from fmnist_study.export import export

        from imagepiece.zoo import ASSET_DIR

        export(study, a.asset_dir or ASSET_DIR)
        return "exported"
    outcome = "report"
    if not a.report:
        outcome = study.run(a.stage, a.only, a.max_minutes, a.fresh, a.ignore_checks,
                            estimator(study, study.steps()))
    S = write_report(study)
    study.log(f"{outcome}; report in {study.ctx.layout.out}/tables.md")
    for c in S["claims"]:
        study.log(f"  {c['verdict']:<28} {c['claim']}")
    if outcome == "gated":  # nothing past the gate ran: not a success
        raise StudyError("stopped at a failed check (see the log above); nothing past it ran")
    return outcome


if __name__ == "__main__":
    try:
        main()
    except StudyError as e:
        sys.exit(f"error: {e}")
