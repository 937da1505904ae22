"""What this CPU can do, read once from /proc/cpuinfo (torch-free, like the rest of `configs`).

The machine kind changes between sessions (an AVX-512 Xeon with avx512_bf16 one day, an EPYC without
any AVX-512 the next), so bf16 on CPU is decided per machine, never by a config alone: without native
bf16 instructions torch emulates bf16 matmuls, and the MiniLM encoder ran at 1.2 texts/s under bf16
autocast on such a CPU (2026-12-01, 2 threads) against ~130-240 texts/s in fp32 (../shared/STACK.md).
"""
from __future__ import annotations

import functools
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    return any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)
