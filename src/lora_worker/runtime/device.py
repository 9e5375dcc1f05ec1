"""Which accelerator this worker has, asked once per job, in one place.

A CUDA runtime newer than the host's driver makes `torch.cuda.is_available()` quietly false, and
a 70B job would then "train" on the CPU until its time limit. With `REQUIRE_CUDA=1` (set in the
image) a job refuses to start without a usable GPU, before it downloads anything.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

GiB = 1024**3


class NoGpuError(RuntimeError):
    """REQUIRE_CUDA is set and no usable CUDA device was found."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str  # the card's name ("NVIDIA H100 80GB HBM3"), or "cpu"
    count: int = 0  # visible CUDA devices
    total_bytes: int = 0  # memory of device 0
    free_bytes: int = 0  # free memory of device 0 when asked

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def detect_device() -> Device:
    if not torch.cuda.is_available():
        return Device("cpu", "cpu")
    free, total = torch.cuda.mem_get_info(0)
    return Device("cuda", torch.cuda.get_device_name(0), torch.cuda.device_count(), total, free)


def require_cuda(device: Device) -> None:
    """Raise NoGpuError naming the likely cause, when no CUDA device is usable."""
    if device.is_cuda:
        return
    built = torch.version.cuda
    cause = (
        f"this image's torch is built for CUDA {built}; the usual cause is a host driver older than "
        f"CUDA {built} needs (run nvidia-smi: its 'CUDA Version' must be {built} or newer)"
        if built
        else "this torch build has no CUDA support at all (a CPU wheel was installed)"
    )
    raise NoGpuError(
        f"REQUIRE_CUDA is set but no usable CUDA GPU was found: {cause}. Restrict the endpoint to "
        "hosts with a recent driver (allowedCudaVersions), or unset REQUIRE_CUDA to run on the CPU."
    )


def free_accelerator_memory() -> None:
    """Collect what callers let go of and hand cached GPU memory back to the driver.

    Callers drop their own references first: a reference held here would keep the model alive.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    """True for both forms an accelerator out-of-memory takes: torch's `OutOfMemoryError` (the
    caching allocator) and a `RuntimeError` such as "CUDA error: out of memory" (a kernel or a
    library that allocates outside the caching allocator, e.g. cuBLAS workspaces or bitsandbytes)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def out_of_memory_message(err: BaseException) -> str | None:
    """`Type: first line` of an out-of-memory error (either form, see is_out_of_memory); None for any
    other error. Keeping only this string lets a handler drop the traceback (and with it the
    failed step's tensors) before anything is retried."""
    if not is_out_of_memory(err):
        return None
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:300]}"


def peak_memory_gib() -> float | None:
    """Peak memory PyTorch allocated on CUDA device 0 in this process (GiB), or None on the CPU."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated(0) / GiB, 2)
