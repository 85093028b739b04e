"""The worked example of docs/tune.md: ``imagepiece tune`` on the shipped baseline.

Run on an idle machine (timing is meaningless on a busy one), from the repository root::

    python studies/tune_example.py

It runs exactly the command printed in docs/tune.md (the shipped baseline on the Fashion-MNIST
test copy shipped with the package, all 10,000 images, the three methods, target 1.5x), writes
``docs/tune/fashion_baseline.{csv,json,png}`` and replaces the table between the
``tune-example`` markers of docs/tune.md with the measured one. Nothing in the document is
typed by hand.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import sys

from rich.console import Console

from imagepiece import tune as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "tune")
DOC = os.path.join(ROOT, "docs", "tune.md")
COMMAND = ("imagepiece tune --model shipped:baseline --max-images 10000 --batch-size 256 --runs 20 "
           "--target-speedup 1.5 --csv docs/tune/fashion_baseline.csv --json docs/tune/fashion_baseline.json "
           "--plot docs/tune/fashion_baseline.png")
START, END = "<!-- tune-example:start -->", "<!-- tune-example:end -->"


def main() -> None:
    os.chdir(ROOT)
    os.makedirs(OUT, exist_ok=True)
    from typer.testing import CliRunner

    from imagepiece.cli import app

    res = CliRunner().invoke(app, shlex.split(COMMAND)[1:], terminal_width=110)
    if res.exit_code != 0:
        sys.exit(f"the command failed ({res.exit_code}):\n{res.output}")
    result = _load(os.path.join(OUT, "fashion_baseline.json"))
    buf = io.StringIO()
    T.render(result, Console(file=buf, width=110, no_color=True))
    block = f"{START}\n```\n$ {COMMAND}\n{buf.getvalue().rstrip()}\n```\n{END}"
    with open(DOC) as f:
        text = f.read()
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    with open(DOC, "w") as f:
        f.write(text)
    print(f"updated {DOC}")


def _load(path: str) -> T.TuneResult:
    import json

    with open(path) as f:
        data = json.load(f)
    rows = [T.TuneRow(**r) for r in data["rows"]]
    chosen = next((r for r in rows if data["chosen"] and r.method == data["chosen"]["method"]), None)
    return T.TuneResult(rows, chosen, data["rule"], data["setup"], data["interrupted"])


if __name__ == "__main__":
    main()
