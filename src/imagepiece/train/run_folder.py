"""The run folder: chosen, locked while a run uses it, never silently reused; its config and
its append-only log."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ..distributed import DistInfo, broadcast_object
from .config import ConfigError, TrainConfig

LOCK_FILE = ".lock"


class _RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` held while a run uses its folder. The kernel drops
    it when the process ends in any way, so a killed run never leaves a stale lock behind."""

    def __init__(self, run_dir: str):
        self.file = open(os.path.join(run_dir, LOCK_FILE), "a+")  # noqa: SIM115  (held open)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise ConfigError(f"run folder {run_dir!r} is in use by another training process; wait "
                              "for it to end or choose another --name") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def _run_contents(run_dir: str) -> list[str]:
    return sorted(e for e in os.listdir(run_dir) if e != LOCK_FILE) if os.path.isdir(run_dir) else []


def _refuse_used(run_dir: str, overwrite: bool) -> None:
    """A new run may not mix its files with another run's; ``overwrite`` replaces only a run
    folder, one holding nothing but what a run writes (never a user's files or other runs)."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run folder {run_dir!r} is a file; choose another --name or --output")
    used = _run_contents(run_dir)
    if used and not overwrite:
        raise ConfigError(f"run folder {run_dir!r} already holds a run ({', '.join(used[:4])}); "
                          f"continue it with --resume {run_dir}, replace it with --overwrite, or choose "
                          "another --name")
    foreign = _not_written_by_a_run(run_dir)
    if used and foreign:
        raise ConfigError(f"--overwrite replaces only a run folder, and {run_dir!r} holds what no run "
                          f"wrote ({', '.join(foreign[:4])}); nothing was deleted: choose another "
                          "--name or --output")


# What a run writes in its folder, and in its checkpoints/ folder (``.NAME.tmp-*`` are killed
# saves); anything else there is not ours to delete.
RUN_ENTRIES = ("config.yaml", ".config.yaml.tmp", "log.jsonl", "log.jsonl.tmp", "checkpoints", LOCK_FILE)
CHECKPOINT_ENTRIES = ("best", "last", "best.old", "last.old")


def _not_written_by_a_run(run_dir: str) -> list[str]:
    """Entries of ``run_dir`` that a run does not write (empty for a run folder)."""
    foreign = [e for e in _run_contents(run_dir) if e not in RUN_ENTRIES]
    ckpt = os.path.join(run_dir, "checkpoints")
    if os.path.lexists(ckpt):
        if os.path.islink(ckpt) or not os.path.isdir(ckpt):
            foreign.append("checkpoints (not a folder)")
        else:
            foreign += [f"checkpoints/{e}" for e in sorted(os.listdir(ckpt))
                        if e not in CHECKPOINT_ENTRIES and not e.startswith((".best.tmp-", ".last.tmp-"))]
    return foreign


def _choose_run_dir(cfg: TrainConfig, resume: str | None) -> str:
    """``resume``, ``output/name``, or a new ``model-method-time`` folder (``-2``, ... when taken)."""
    if resume:
        return resume
    if cfg.name:
        return os.path.join(cfg.output, cfg.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = os.path.join(cfg.output, f"{cfg.model}-{cfg.method.replace(':', '_')}-{stamp}")
    run_dir, n = stem, 1
    while os.path.lexists(run_dir):
        n += 1
        run_dir = f"{stem}-{n}"
    return run_dir


def _claim(run_dir: str, resume: str | None, overwrite: bool) -> _RunLock:
    """Lock ``run_dir`` for this run; a new run refuses a folder holding another run's files
    (checked again under the lock: a second run may have claimed it in between)."""
    if not resume:
        _refuse_used(run_dir, overwrite)
    os.makedirs(run_dir, exist_ok=True)
    lock = _RunLock(run_dir)
    try:
        if not resume:
            _refuse_used(run_dir, overwrite)
            for entry in _run_contents(run_dir):  # --overwrite: the old run goes, as a whole
                path = os.path.join(run_dir, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def claimed(cfg: TrainConfig, info: DistInfo, resume: str | None, overwrite: bool) -> Iterator[str]:
    """The run folder, locked by the main process for the duration; every process gets the same
    folder (a default name holds the time) and the same error when it is refused. A new run
    that fails before its first checkpoint (a corrupt image, a bad size) takes its files back
    out, and its folder when it made it: no half-made run is left behind."""
    lock, outcome, made = None, None, False
    if info.main:
        try:
            run_dir = _choose_run_dir(cfg, resume)
            made = not os.path.lexists(run_dir)
            lock = _claim(run_dir, resume, overwrite)
            outcome = ("ok", run_dir)
        except ConfigError as e:
            outcome = ("error", str(e))
        except OSError as e:
            outcome = ("error", f"cannot create the run folder: {e}")
    kind, value = broadcast_object(outcome, info)
    if kind == "error":
        raise ConfigError(value)
    try:
        yield value
    except Exception:
        if lock is not None and not resume:
            lock.release()
            lock = None
            _take_back(value, made)
        raise
    finally:
        if lock is not None:
            lock.release()


def _take_back(run_dir: str, made: bool) -> None:
    """Remove what a new run wrote when it failed before any checkpoint (nothing else)."""
    if os.path.lexists(os.path.join(run_dir, "checkpoints")):
        return  # an epoch was saved: the run can be resumed
    for entry in RUN_ENTRIES:
        path = os.path.join(run_dir, entry)
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
    if made and not os.listdir(run_dir):
        os.rmdir(run_dir)


def write_config(run_dir: str, cfg: TrainConfig) -> None:
    import yaml

    tmp = os.path.join(run_dir, ".config.yaml.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, os.path.join(run_dir, "config.yaml"))


def repair_log(path: str, before_epoch: int, last_row: Mapping[str, Any] | None) -> None:
    """Bring the log to the epochs a resumed run will not redo: drop our lines of epochs it
    redoes, restore the line of the last saved epoch from its checkpoint when a kill came
    between the save and the line, and drop our half-written last line (killed while writing).

    The log is append-only: every other line (a comment, a note, bytes that are not UTF-8) is
    kept as it is, where it is.
    """
    kept: list[bytes] = []
    epochs = set()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        for i, line in enumerate(lines):
            row = _our_row(line)
            if row is None:
                torn = i == len(lines) - 1 and not line.endswith(b"\n") and line.startswith(b'{"epoch"')
                if not torn:
                    kept.append(line if line.endswith(b"\n") else line + b"\n")
            elif row["epoch"] < before_epoch:
                kept.append(line)
                epochs.add(row["epoch"])
    if last_row and last_row.get("epoch") == before_epoch - 1 and before_epoch - 1 not in epochs:
        kept.append((json.dumps(dict(last_row)) + "\n").encode())
    with open(path + ".tmp", "wb") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _our_row(line: bytes) -> dict[str, Any] | None:
    """The epoch row a run wrote on ``line`` (a JSON object with an integer ``epoch``), else None."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
        return row
    return None
