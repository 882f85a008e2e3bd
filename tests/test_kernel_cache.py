"""The bound on oneDNN's kernel caches that importing qlorakit sets (see qlorakit/__init__.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# in a fresh process: import qlorakit first, then run bf16 matmuls of 800 different shapes and report
# how much the C heap grew (glibc's mallinfo2: bytes in use, small and mapped blocks)
PROBE = r"""
import ctypes, json
import qlorakit
import torch

class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI

def in_use():
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20

torch.set_num_threads(1)
w = torch.randn(256, 64, dtype=torch.bfloat16)
x = torch.randn(900, 64, dtype=torch.bfloat16)
x[:1] @ w.t()
before = in_use()
for n in range(2, 802):
    x[:n] @ w.t()
print(json.dumps({"grew_mb": in_use() - before}))
"""


def _grown_mb(capacity: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    if capacity is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = env["LRU_CACHE_CAPACITY"] = capacity
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "mallinfo2" in out.stderr:
        pytest.skip("the C library has no mallinfo2 (glibc 2.33 or later) to measure the heap with")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["grew_mb"]


def test_importing_qlorakit_bounds_the_matmul_kernel_caches():
    """800 matmul shapes: with the caches at torch's default (set explicitly, which qlorakit keeps)
    the heap grows with every shape; with qlorakit's default it stops at 256 shapes' worth."""
    unbounded = _grown_mb("1024")
    if unbounded < 100:
        pytest.skip(f"bf16 matmuls keep no per-shape kernels on this CPU (heap grew {unbounded:.0f} MB "
                    "over 800 shapes): nothing to bound")
    bounded = _grown_mb(None)
    assert bounded < 0.45 * unbounded, (bounded, unbounded)
    assert bounded < 200, bounded
