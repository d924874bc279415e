"""Where a recipe trains: the device from config, mixed precision where it helps, and the process group
of a data-parallel run.

`resolve("auto")` is CUDA when torch sees a GPU, else the CPU; "cpu", "cuda" and "cuda:N" are taken as
given and fail in one line when that device is missing. Under a torchrun-style launch (WORLD_SIZE > 1 in
the environment) `Placement.start` joins the process group (nccl on CUDA, gloo on CPU) and each rank takes
the GPU of its LOCAL_RANK. Models are built on the CPU first (the same initial weights whatever the
device, for a seed) and then moved; batches are chosen by a CPU generator, so the data order is the same
on every device too.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(RuntimeError):
    """The configured device is not usable here."""


def resolve(name: str, local_rank: int = 0) -> torch.device:
    """The torch device for a config value ("auto", "cpu", "cuda", "cuda:N")."""
    name = (name or "auto").strip().lower()
    if not DEVICE_PATTERN.fullmatch(name):
        raise DeviceError(f"device {name!r} is not auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: torch {torch.__version__} sees no CUDA GPU here")
    index = int(name.split(":")[1]) if ":" in name else local_rank
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device cuda:{index}: only {torch.cuda.device_count()} GPU(s) here")
    return torch.device("cuda", index)


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked (no loss scaling needed, unlike fp16); nothing on the CPU, where
    bf16 matmuls are slower than fp32 on most machines."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def amp_wanted(option: str, default: bool) -> bool:
    """An `amp` option: "auto" leaves it to the recipe (`default`), else a boolean."""
    option = (option or "auto").strip().lower()
    if option == "auto":
        return default
    if option in ("1", "true", "yes", "on", "bf16"):
        return True
    if option in ("0", "false", "no", "off"):
        return False
    raise DeviceError(f"option amp={option!r} is not auto, on or off")


@dataclass
class Placement:
    """The device of this process and its place in a data-parallel run (world 1 when alone)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    amp: bool = False

    @classmethod
    def start(cls, device: str = "auto", amp: str = "auto", amp_default: bool = False) -> Placement:
        """This process's placement; joins the process group under a torchrun-style launch."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve(device, local)
        if dev.type == "cuda":
            # deterministic cuBLAS (torch.use_deterministic_algorithms needs it before the first matmul)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.cuda.set_device(dev)
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        wanted = amp_wanted(amp, amp_default)
        return cls(dev, rank, world, wanted and dev.type == "cuda")

    @property
    def main(self) -> bool:
        """The rank that writes results."""
        return self.rank == 0

    def describe(self) -> dict[str, str]:
        """What goes with the checkpoint: device, GPU name, precision, world size."""
        return {"device": str(self.device), "gpu": gpu_name(self.device),
                "precision": "bf16-autocast" if self.amp else "fp32", "world": str(self.world)}

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (e.g. one rank ran out of time)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a copy; `value` is left as it was)."""
        if self.world == 1:
            return value
        t = value.detach().clone()
        torch.distributed.all_reduce(t)
        return t

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            # Every rank done with the group before any tears it down: a rank that destroyed it while its
            # peer still talked was killed by gloo now and then (SIGABRT, "terminate called without an
            # active exception").
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


CPU = Placement(torch.device("cpu"))
