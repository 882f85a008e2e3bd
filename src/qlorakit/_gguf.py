"""Reading GGUF files once: :func:`shared_gguf_readers`."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["shared_gguf_readers"]

# gguf.GGUFReader._get's parameters as of gguf 0.17-0.19; the faster parse below replaces that method
_GET_PARAMS = ["self", "offset", "dtype", "count", "override_order"]


@functools.cache  # one subclass per reader class, however many blocks are entered
def _fast_reader_class(real: type) -> type:
    """``real`` (gguf.GGUFReader) with its header parse about 3x faster (the packaged model: 5.5 -> 1.9 s
    on a 2-core CPU): the parse reads millions of small slices (a length and the bytes of each of 49k
    tokens and 49k merges), and a slice of the ``np.memmap`` it reads through runs memmap's
    ``__array_finalize__`` each time; this one slices a plain ndarray view of the same map. Fields and
    tensors hold the same values (a test compares them). If a later gguf changes that method's
    parameters, ``real`` is used as it is."""
    try:
        if list(inspect.signature(real._get).parameters) != _GET_PARAMS:
            return real
    except (AttributeError, TypeError, ValueError):
        return real

    class FastGGUFReader(real):  # type: ignore[misc, valid-type]
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> Any:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)  # the same map, read-only in mode 'r'
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    FastGGUFReader.__name__ = FastGGUFReader.__qualname__ = real.__name__
    return FastGGUFReader


@contextlib.contextmanager
def shared_gguf_readers() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once, however often it is opened, and faster
    (:func:`_fast_reader_class`).

    ``gguf.GGUFReader`` parses a header field by field: the packaged model's 49k-token vocabulary and
    merges take it about 5.5 s on a 2-core CPU, and transformers opens a GGUF file three times to load
    a model and its tokenizer (config, tokenizer, weights), the export check twice more. Readers are
    only read from (fields, tensor views of a read-only map), so the block hands every opener of the
    same file (path, inode, size, modification time) the same one; ``gguf.GGUFReader`` is restored on exit
    and the cached readers are dropped. Nested blocks share the outer one's cache."""
    import gguf

    real = gguf.GGUFReader
    if getattr(real, "_qlorakit_shared", False):
        yield
        return
    readers: dict[tuple[str, int, int, int], Any] = {}
    fast = _fast_reader_class(real)

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        if mode != "r":
            return real(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = fast(path, mode)
        return readers[key]

    reader._qlorakit_shared = True  # type: ignore[attr-defined]
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real
        readers.clear()
