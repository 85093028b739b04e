"""Checks of user-given values shared by the tools: booleans, counts, output paths, JSON numbers.

Every tool calls these before it starts any work, so a bad value ends the command with one line
that names the value and what is allowed, and nothing is written.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from typing import Any

__all__ = ["OptionError", "check_count", "check_output_dir", "check_output_file", "check_outputs",
           "check_threads", "json_safe", "output_problem", "parse_bool", "plot_formats"]

TRUE_WORDS = ("true", "yes", "on")
FALSE_WORDS = ("false", "no", "off")


class OptionError(ValueError):
    """An option has a value that is not allowed."""


def parse_bool(value: Any, name: str) -> bool:
    """``value`` as a bool; only real booleans and the words true/false, yes/no, on/off count.

    YAML reads ``maybe`` as a string and ``3`` as an int; both would silently count as true.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise OptionError(f"{name}={value!r} is not allowed; expected true or false")


def check_count(value: Any, name: str, low: int = 1) -> int | None:
    """``value`` when it is None or an integer >= ``low`` (never 0 standing for "the default")."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OptionError(f"{name}={value!r} is not allowed; expected an integer >= {low}")
    return value


def check_threads(value: Any, name: str = "--threads") -> int | None:
    """A ``torch.set_num_threads`` count: None (torch's default) or >= 1."""
    return check_count(value, name, 1)


def _nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_writable_folder(folder: str, option: str, value: str) -> None:
    """``folder`` (existing) must be a folder this process can create files in.

    Root passes ``os.access`` on any folder, so the check also opens an unnamed temporary file
    there (``O_TMPFILE`` on Linux leaves no trace), which fails on a read-only file system.
    """
    if not os.path.isdir(folder):
        raise OptionError(f"{option} {value!r}: {folder!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {value!r}: folder {folder!r} is not writable")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OptionError(f"{option} {value!r}: folder {folder!r} is not writable ({e.strerror})") from None


def check_output_file(path: Any, option: str, suffixes: Iterable[str] = ()) -> str:
    """An output file path that can be written: not a folder, under a writable folder (missing
    folders are created later by the writer), with one of ``suffixes`` when given."""
    if not isinstance(path, str) or not path.strip():
        raise OptionError(f"{option} {path!r} is not a file name")
    suffixes = tuple(suffixes)
    if suffixes and not path.lower().endswith(suffixes):
        raise OptionError(f"{option} {path!r}: allowed file types: {', '.join(suffixes)}")
    if os.path.isdir(path):
        raise OptionError(f"{option} {path!r} is a folder; give a file name")
    _check_writable_folder(_nearest_existing(os.path.dirname(os.path.abspath(path))), option, path)
    return path


def check_output_dir(path: Any, option: str) -> str:
    """An output folder that exists and is writable, or can be created under a writable folder."""
    if not isinstance(path, str) or not path.strip():
        raise OptionError(f"{option} {path!r} is not a folder name")
    _check_writable_folder(_nearest_existing(path), option, path)
    return path


def plot_formats() -> list[str]:
    """The figure file types matplotlib can write (``png``, ``pdf``, ``svg``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def output_problem(path: str, option: str) -> str | None:
    """Why ``path`` cannot be written as the output of ``option`` (``--json``, ``--csv``,
    ``--plot``), or None. Writes nothing; missing folders are fine (they are created)."""
    if not str(path).strip():
        return f"{option} is empty; expected a file name"
    full = os.path.abspath(path)
    if os.path.isdir(full):
        return f"{option} {path!r} is a directory; expected a file name inside it"
    if option == "--plot":
        ext = os.path.splitext(full)[1].lower().lstrip(".")
        formats = plot_formats()
        if ext not in formats:
            return (f"{option} {path!r} has an unsupported extension {repr('.' + ext) if ext else '(none)'}; "
                    f"allowed: {', '.join('.' + f for f in formats)}")
    try:
        check_output_file(path, option)
    except OptionError as e:
        return str(e)
    return None


def check_outputs(json_path: str | None = None, csv_path: str | None = None,
                  plot_path: str | None = None) -> None:
    """Raise :class:`OptionError` for an output path that cannot be written (a directory, a file
    in the way of a folder, a read-only folder, an unsupported plot extension, one file for two
    outputs). Writes nothing; run it before any work."""
    given = [(o, p) for o, p in (("--json", json_path), ("--csv", csv_path), ("--plot", plot_path))
             if p is not None]
    seen: dict[str, str] = {}
    for option, path in given:
        problem = output_problem(path, option)
        if problem:
            raise OptionError(problem)
        full = os.path.realpath(path)
        if full in seen:
            raise OptionError(f"{seen[full]} and {option} both name {path!r}; give two files")
        seen[full] = option


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None: JSON has no such numbers, and Python's
    ``NaN`` token makes the file unreadable to strict parsers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
