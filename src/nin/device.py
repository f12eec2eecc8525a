"""Where a model runs: picking the device, mixed precision there, and describing the machine.

Training, evaluation, the report, the exercises and the command line all use these, so none of
them reaches into another's module for them.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nin.errors import NinError


def pick_device(requested: str | None = None) -> tuple[torch.device, str]:
    """The device to run on, and why it was chosen: CUDA, then Apple MPS, then CPU."""
    if requested:
        try:
            device = torch.device(requested)
            if device.type == "meta":
                raise RuntimeError("it holds shapes, not data; use cuda, mps or cpu")
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as e:
            raise NinError(f"device {requested!r} is not usable here ({e})") from None
        return device, "as requested"
    if torch.cuda.is_available():
        return torch.device("cuda"), "a CUDA GPU was found"
    if torch.backends.mps.is_available():
        return torch.device("mps"), "an Apple GPU was found"
    return torch.device("cpu"), "no CUDA or MPS device found"


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move `model` to `device`, in channels-last memory format when asked."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type: bfloat16 on CPUs and recent GPUs, float16 on GPUs without bfloat16."""
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        try:  # emulated bfloat16 (V100, T4) is slow: those GPUs get float16
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older PyTorch has no such argument
            native = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float16
    return None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast (see `amp_dtype`) when enabled; a no-op elsewhere."""
    dtype = amp_dtype(device)
    if not (enabled and dtype):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast, where small gradients would underflow; a pass-through
    otherwise (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)


def memory_budget(device: torch.device) -> int:
    """Bytes a data set may take on `device`: half of what is free there now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # no such counter here: assume 4 GiB free
        return 2 * 2**30


def cpu_name() -> str:
    """The processor's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where something ran: versions, processor and device (saved with every run's config)."""
    device = torch.device(device)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def describe(env: dict[str, Any]) -> str:
    """An `environment` in one line: CPU and threads, the GPU if any, torch and Python."""
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    return (
        f"{env.get('cpu', '?')}, {env.get('cpu_threads', '?')} threads{gpu}, "
        f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}"
    )
