"""What machine and software produced a result: stamped on every benchmark and report."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def machine_info() -> dict:
    """Platform, CPU count, Python / torch / numpy versions and the CUDA device (if any)."""
    import numpy
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": "cpu",
    }
    for package in ("torchvision", "opencv-python-headless", "scikit-learn"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["device"] = f"cuda: {torch.cuda.get_device_name(0)}"
        info["cuda"] = torch.version.cuda
    return info


def describe_machine() -> str:
    """One line naming the machine, e.g. 'cpu, 2 cores, Linux-..., torch 2.14.1'."""
    info = machine_info()
    return f"{info['device']}, {info['cpu_count']} CPU cores, {info['platform']}, torch {info['torch']}"
