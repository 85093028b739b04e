"""Markdown tables of a Fashion-MNIST study run, for docs/study.md.

    python studies/fashion_mnist_tables.py results/fashion_mnist/cpu > /tmp/tables.md

Prints the ``tables.md`` that ``python studies/fashion_mnist.py`` (or ``--report``) wrote into
that folder: checks, operating points, curves, the matched-compute table, tuning, the claims
with their verdicts, the speed measurement and every row with the command that reproduces it.
"""

from __future__ import annotations

import os
import sys


def main(folder: str) -> None:
    path = os.path.join(folder, "tables.md")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} does not exist; run python studies/fashion_mnist.py --report first")
    with open(path) as f:
        print(f.read(), end="")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/fashion_mnist/cpu")
