"""What a failing measurement means for the rest of a run.

A device error that poisons the CUDA context stops the run (Fatal); every other
failure (OOM, a compile error, an unsupported shape) only skips what failed.
"""

from __future__ import annotations

import torch


class Fatal(RuntimeError):
    """A device error after which nothing else can run (the CUDA context is poisoned)."""


class Skip(Exception):
    """Raised by a bench's setup or an implementation's build: this case does not apply
    (the message says why); a note, not a failure."""


_DEVICE_ERROR_MARKERS = ("CUDA error", "illegal memory access", "unspecified launch failure", "device-side assert",
                         "misaligned address", "illegal instruction", "CUBLAS_STATUS_EXECUTION_FAILED")


def is_fatal(exc: BaseException) -> bool:
    """A device error that left the CUDA context unusable (sticky: illegal address, device assert,
    ...). A non-sticky CUDA error (e.g. a bad launch configuration) is not fatal: we probe the
    device with a tiny kernel and a sync, and only a failing probe stops the run."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    looks = (accel is not None and isinstance(exc, accel)) or any(m in str(exc) for m in _DEVICE_ERROR_MARKERS)
    if not looks or not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return False
    except Exception:  # noqa: BLE001
        return True


def short_error(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(exc).__name__}: {msg}"


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
