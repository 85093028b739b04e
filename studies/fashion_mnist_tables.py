"""Markdown tables of a Fashion-MNIST study run, for docs/study.md.

    python studies/fashion_mnist_tables.py results/fashion_mnist/cpu > /tmp/tables.md
    python studies/fashion_mnist_tables.py --sync docs/study.md     # copy the tables into the page
    python studies/fashion_mnist_tables.py --check docs/study.md    # exit 1 if the page is behind

Without ``--sync``/``--check``: prints the ``tables.md`` that ``python studies/fashion_mnist.py``
(or ``--report``) wrote into the results folder: checks, operating points, curves, the
matched-compute table, tuning, the claims with their verdicts, the speed measurement and every
row with the command that reproduces it.

``--sync PAGE`` replaces every block of PAGE written as

    <!-- tables.md: TITLE -->
    ...
    <!-- /tables.md -->

by the first table under ``### TITLE`` in ``tables.md``, so the page's copies of the generated
tables never drift from the results; the prose around them stays the page's own.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fmnist_study.store import write_text  # noqa: E402

BLOCK = re.compile(r"(<!-- tables\.md: (?P<title>.+?) -->\n)(?P<body>.*?)(<!-- /tables\.md -->)", re.S)


class TablesError(ValueError):
    """A page names a table that tables.md does not have, or a file is missing."""


def first_tables(markdown: str) -> dict[str, str]:
    """``### TITLE`` -> the first markdown table under it (its lines, newline-terminated)."""
    out = {}
    for section in re.split(r"^### ", markdown, flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        table = re.search(r"(?:^\|.*\n)+", body, flags=re.M)
        if table:
            out[title.strip()] = table.group(0)
    return out


def sync(page: str, tables: dict[str, str]) -> str:
    """``page`` with every marked block replaced by its table; :class:`TablesError` for a title
    that ``tables`` lacks (the whole page is checked before anything is replaced)."""
    unknown = sorted({m.group("title") for m in BLOCK.finditer(page)} - set(tables))
    if unknown:
        raise TablesError(f"the page names table(s) {unknown} that tables.md does not have; "
                          f"allowed: {sorted(tables)}")
    return BLOCK.sub(lambda m: m.group(1) + tables[m.group("title")] + m.group(4), page)


def _read(path: str) -> str:
    if not os.path.isfile(path):
        raise TablesError(f"{path} does not exist" + ("; run python studies/fashion_mnist.py --report "
                                                      "first" if path.endswith("tables.md") else ""))
    with open(path) as f:
        return f.read()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default="results/fashion_mnist/cpu", help="the study's results")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sync", metavar="PAGE", help="rewrite the marked tables of PAGE")
    mode.add_argument("--check", metavar="PAGE", help="exit 1 if a marked table of PAGE differs")
    a = p.parse_args(argv)
    source = _read(os.path.join(a.folder, "tables.md"))
    if not (a.sync or a.check):
        print(source, end="")
        return 0
    path = a.sync or a.check
    page = _read(path)
    new = sync(page, first_tables(source))
    if a.check:
        behind = new != page
        print(f"{path}: {'behind tables.md (run --sync)' if behind else 'in sync with tables.md'}")
        return 1 if behind else 0
    if new != page:
        write_text(path, new)
    print(f"{path}: {len(BLOCK.findall(new))} tables synced from {a.folder}/tables.md")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TablesError as e:
        sys.exit(f"error: {e}")
