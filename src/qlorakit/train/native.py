"""Native CPU kernels of the fast path, built on first use with ``torch.utils.cpp_extension``.

``csrc/segment_attention.cpp`` holds the backward of the segment attention's per-segment loop
(:mod:`qlorakit.train.attention`) with the values of the Python loop: each segment's operands are
built into contiguous blocks of one reused buffer, the same batched matmuls run on them, and the two
elementwise steps between them are vectorised loops that skip the causally masked half of each
score matrix. Driven from Python, that loop pays a dispatch per op and segment, a guard check per
compiled kernel, and a copy of every operand view the batched matmul takes only contiguous.
Measured on the packaged model (4 x 512 packed tokens, 9 segments a row of the batch, bf16 on an
AMX CPU), a layer's attention backward takes about 15 ms against 25 ms through the Python loop.

``csrc/amx_attention.cpp`` holds the segment attention's forward and backward on AMX tiles (oneDNN's
batch-reduce GEMM micro-kernel through ATen's ``cpublas::brgemm``), used where ATen can pack bf16
operands for it (:func:`amx_attention_ops`): 1.8 ms forward and 3.6 ms backward a layer on the same
batch, against 4.1 ms for PyTorch's flash kernel and 12 ms for the loop above; a step 1.47 s.

``csrc/cross_entropy.cpp`` holds the cross-entropy over the vocabulary with its gradient
(:func:`qlorakit.train.kernels.ce_fwd_bwd_`): each row goes once through an fp32 buffer in cache,
one exp a logit where the inductor kernel takes two (41 against 126 ms on a (2048, 49152) chunk).
With both, a training step of the packaged model takes 1.93 s against 2.34 s (median of 10 steps,
``QLORAKIT_NATIVE=1`` and ``0`` in turn, two runs each).

The library is compiled for this CPU (``-march=native``) into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), under a name that holds a
digest of the CPU's model and flags, the sources and torch's version, so a cache shared between
machines never hands one CPU another's build. Building takes about ten seconds, once. Without a C++
compiler or ninja, on a CPU without bf16 instructions (the fp32 path), or with
``QLORAKIT_NATIVE=0``, the Python loop and the inductor kernel run; a build that fails is logged
with its error and they run too.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["amx_attention_ops", "attention_ops", "cross_entropy_ops", "native_enabled"]

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "segment_attention.cpp", CSRC / "cross_entropy.cpp", CSRC / "amx_attention.cpp"]
HEADERS = [CSRC / "common.h"]
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def native_enabled() -> bool:
    """False when the environment asks for the Python loops (``QLORAKIT_NATIVE=0``)."""
    return os.environ.get("QLORAKIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_digest() -> str:
    """The CPU's model name and flags, the source and torch's version, hashed: the build's identity."""
    h = hashlib.sha256()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("model name", "flags")):
                h.update(line.encode())
                if line.startswith("flags"):
                    break
    else:
        h.update(platform.processor().encode())
    for f in SOURCES + HEADERS:
        h.update(f.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _library() -> bool:
    """Build (once per CPU and source) and load the library; False where it can't be."""
    if not native_enabled() or platform.machine() not in ("x86_64", "AMD64"):
        return False
    from torch.utils.cpp_extension import is_ninja_available, load

    from .kernels import compile_available

    if not compile_available() or not is_ninja_available():
        log.info("native kernels not built (no C++ compiler or no ninja); the Python loops run")
        return False
    name = f"qlorakit_native_{_cpu_digest()}"
    try:
        log.info("building the native kernels for this CPU (once, about ten seconds)")
        load(name=name, sources=[str(f) for f in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
             extra_include_paths=[str(CSRC)], is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as e:  # a broken toolchain: training goes on without
        log.warning("could not build the native kernels (%s: %s); the Python loops run instead",
                    type(e).__name__, e)
        return False
    return True


def attention_ops() -> Any | None:
    """``torch.ops.qlorakit_attn`` (built and loaded on the first call), or None where it can't be."""
    return torch.ops.qlorakit_attn if _library() else None


def cross_entropy_ops() -> Any | None:
    """``torch.ops.qlorakit_ce`` (built and loaded on the first call), or None where it can't be."""
    return torch.ops.qlorakit_ce if _library() else None


def amx_attention_ops() -> Any | None:
    """``torch.ops.qlorakit_amx`` (csrc/amx_attention.cpp) where the library is built and ATen can
    pack bf16 operands for oneDNN's AMX micro-kernel on this CPU, else None."""
    if not _library() or not torch.ops.qlorakit_amx.available():
        return None
    return torch.ops.qlorakit_amx
