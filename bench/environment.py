"""Where a run happens: the device, its name, torch's settings and the commit of the tree."""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parent.parent


def resolve_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return torch.device(arg)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def git_commit() -> str:
    """git rev-parse HEAD, plus '-dirty' when the tree has changes (bench/results/ excluded).

    CRAM_COMMIT overrides it, for copies of the tree without .git (the device machine)."""
    if os.environ.get("CRAM_COMMIT"):
        return os.environ["CRAM_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_DIR, capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return sha + "-dirty?"
    changed = [line for line in status.splitlines() if line.strip() and "bench/results/" not in line]
    return sha + ("-dirty" if changed else "")


@dataclass
class Env:
    device: torch.device
    device_name: str
    torch: str
    commit: str

    @classmethod
    def detect(cls, device: torch.device) -> "Env":
        return cls(device, device_name(device), torch.__version__, git_commit())

    @property
    def slug(self) -> str:
        return device_slug(self.device_name)


def setup_torch(threads: int | None = None, compiling: bool = False) -> None:
    """Thread count; when torch.compile will be used, many recompiles allowed (one per
    shape/dtype/pass). Dynamo is imported only then (importing it costs ~1.5 s)."""
    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*TF32.*")
    if not compiling:
        return
    try:
        import torch._dynamo.config as dconf

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dconf, name):
                setattr(dconf, name, max(256, getattr(dconf, name)))
        if hasattr(dconf, "accumulated_recompile_limit"):
            dconf.accumulated_recompile_limit = max(4096, dconf.accumulated_recompile_limit)
    except Exception:  # torch without dynamo config: nothing to raise
        pass
