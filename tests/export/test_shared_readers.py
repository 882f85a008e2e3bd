"""shared_gguf_readers: within the block a GGUF file is parsed once, however often it is opened (as
transformers opens it for config, tokenizer and weights); a rewritten file is parsed again; the
gguf package's reader is restored afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from qlorakit._gguf import shared_gguf_readers
from qlorakit.export import read_gguf


def _write(path, tokens, weight):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(tokens)
    w.add_tensor("token_embd.weight", weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def counting(monkeypatch):
    import gguf

    parsed = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            parsed.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    return Counting, parsed


def test_each_file_is_parsed_once_inside_and_again_when_rewritten(tmp_path, counting):
    import gguf

    Counting, parsed = counting
    path = tmp_path / "m.gguf"
    other = tmp_path / "o.gguf"
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    _write(path, ["a", "b", "c"], weight)
    _write(other, ["x"], weight[:1])
    with shared_gguf_readers():
        from gguf import GGUFReader  # as transformers imports it, at the time of the call

        first = GGUFReader(str(path))
        assert GGUFReader(path) is first  # a Path and a str name the same file
        assert read_gguf(path)["meta"]["tokenizer.ggml.tokens"] == ["a", "b", "c"]
        np.testing.assert_array_equal(read_gguf(other)["tensors"]["token_embd.weight"]["shape"], (1, 4))
        with shared_gguf_readers():  # nested: the same cache
            assert gguf.GGUFReader(str(path)) is first
        assert parsed == [str(path), str(other)]
        np.testing.assert_array_equal(np.asarray(first.tensors[0].data), weight)

        _write(path, ["a", "b", "c", "d"], weight * 2)  # rewritten in the block: parsed again
        assert read_gguf(path)["meta"]["tokenizer.ggml.tokens"] == ["a", "b", "c", "d"]
        np.testing.assert_array_equal(np.asarray(gguf.GGUFReader(path).tensors[0].data), weight * 2)
        assert len(parsed) == 3
    assert gguf.GGUFReader is Counting  # restored
    read_gguf(path)
    read_gguf(path)
    assert len(parsed) == 5  # outside the block every open parses


def test_the_reader_is_restored_when_the_block_raises(counting):
    import gguf

    Counting, _ = counting
    with pytest.raises(RuntimeError, match="inside"):
        with shared_gguf_readers():
            assert gguf.GGUFReader is not Counting
            raise RuntimeError("inside")
    assert gguf.GGUFReader is Counting


def _same_parse(a, b):
    assert list(a.fields) == list(b.fields)
    for k, fa in a.fields.items():
        fb = b.fields[k]
        assert (fa.offset, fa.name, fa.data, fa.types) == (fb.offset, fb.name, fb.data, fb.types), k
        assert len(fa.parts) == len(fb.parts), k
        for pa, pb in zip(fa.parts, fb.parts):
            assert pa.dtype == pb.dtype and np.array_equal(pa, pb), k
        assert fa.contents() == fb.contents(), k
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in a.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


def test_the_faster_parse_reads_what_gguf_reads(tmp_path):
    """Every field (part by part, and decoded) and every tensor the same as gguf's own reader: on a file
    with each kind of field, and on the packaged model's GGUF (49k tokens and merges)."""
    import gguf

    from qlorakit._gguf import _fast_reader_class
    from qlorakit.models.loader import default_gguf_path

    fast = _fast_reader_class(gguf.GGUFReader)
    assert fast is not gguf.GGUFReader  # the installed gguf has the method this replaces
    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("k.u32", 7)
    w.add_int64("k.i64", -3)
    w.add_float32("k.f32", 0.25)
    w.add_float64("k.f64", 1e-300)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "héllo")
    w.add_array("k.ints", [1, 2, 3])
    w.add_array("k.floats", [0.5, -1.5])
    w.add_array("k.strs", ["a", "", "ünï"])
    w.add_tensor("t.f32", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("t.f16", np.ones((4, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same_parse(gguf.GGUFReader(str(path)), fast(str(path)))
    packaged = str(default_gguf_path())
    _same_parse(gguf.GGUFReader(packaged), fast(packaged))
