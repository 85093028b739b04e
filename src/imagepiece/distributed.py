"""One process or many under torchrun: which process this is, on which device.

``train`` and ``evaluate`` both join the torchrun process group through :func:`setup_distributed`;
keeping it here (and not in ``train``) lets evaluation run without importing the training code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DEVICES", "DeviceError", "DistInfo", "LostPeerError", "all_reduce_sum", "broadcast_object",
           "check_device", "finish", "lost_peer", "resolve_device", "setup_distributed"]

#: The device names every tool accepts; ``cuda:N`` (a GPU by index) as well. ``mps`` is Apple's
#: GPU, accepted where this torch build and machine have it.
DEVICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(ValueError):
    """A device that is not allowed or not present."""


class LostPeerError(RuntimeError):
    """Another process of a torchrun run went away (killed, crashed, its machine lost)."""


# What gloo, NCCL and the TCP store say when the other end of a connection is gone.
_LOST = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|Connection refused|"
                   r"NCCL communicator was aborted|Socket Timeout|timed out", re.IGNORECASE)
_PEER = re.compile(r"by peer \[([^\]]+)\]:(\d+)")


def lost_peer(error: BaseException, info: DistInfo) -> LostPeerError | None:
    """The one-line error for a collective of a many-process run that failed because a peer is
    gone (instead of the backend's traceback), or None for any other error."""
    text = str(error)
    reason = _LOST.search(text)
    if not info.distributed or reason is None:
        return None
    peer = _PEER.search(text)
    where = f" at {peer.group(1)}:{peer.group(2)}" if peer else ""
    return LostPeerError(f"rank {info.rank} lost a peer process of this {info.world_size}-process run{where} "
                         f"({reason.group(0)}); the others stop too. Continue with --resume RUN_DIR once "
                         "every process can run")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank, number of processes, local GPU index, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_device(device: Any, option: str = "device") -> str:
    """``device`` (trimmed, lower case) when it is one of :data:`DEVICES` or ``cuda:N`` and
    present on this machine; a one-line error otherwise. The one device check of every tool
    (train, eval, analyze, visualize, bench), run before any work, so a typo (``tpu``) is not
    silently run on the CPU."""
    dev = device.strip().lower() if isinstance(device, str) else device
    if not isinstance(dev, str) or not (dev in DEVICES or (dev[:5] == "cuda:" and dev[5:].isdigit())):
        raise DeviceError(f"{option}={device!r}; allowed: {', '.join(DEVICES)}, cuda:N")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{option}={device!r} but CUDA is not available on this machine; use cpu or "
                          "auto")
    if dev == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option}={device!r} but this machine (or torch build) has no MPS device; use "
                          "cpu or auto")
    if dev[:5] == "cuda:" and int(dev[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"{option}={device!r} does not exist; this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s): cuda:0..")
    return dev


def resolve_device(device: Any, option: str = "device") -> torch.device:
    """The :class:`torch.device` a checked ``device`` names (``auto``: CUDA when available)."""
    dev = check_device(device, option)
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(dev)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when there is one (nccl on GPU, gloo on CPU)."""
    asked = resolve_device(device)
    use_cuda = asked.type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if asked.index is not None and world > 1:
        raise DeviceError(f"device={device!r} names one GPU, but torchrun gives each of its {world} "
                          "processes its own (LOCAL_RANK); use --device cuda")
    index = local if asked.index is None else asked.index
    if use_cuda:
        torch.cuda.set_device(index)
    dev = torch.device("cuda", index) if use_cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """``values`` summed over all processes (unchanged on one process)."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """The main process's ``obj`` on every process (so all agree on e.g. a run folder or an error)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish(info: DistInfo) -> None:
    """Wait for every process, then leave the process group."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
