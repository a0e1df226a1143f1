"""The CPU a benchmark ran on, as each one prints it beside its figures.

Machines of one kind differ (some have AVX-512 VNNI and AMX, some only AVX2), and ONNX
Runtime's kernels follow the instruction sets: a figure means little without them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# what decides ONNX Runtime's and torch's CPU kernels here (int8: VNNI and AMX)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu() -> str:
    """The CPU's model name, the CPUs this process sees, and which of ``CPU_FLAGS`` it has."""
    name, flags = platform.processor() or platform.machine() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return f"{name}, {os.cpu_count()} CPUs; {' '.join(present) or 'none of ' + ' '.join(CPU_FLAGS)}"
