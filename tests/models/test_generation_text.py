"""The text a generation returns when max_tokens cuts it inside a character."""

from __future__ import annotations

from qlorakit.models import load_tokenizer, resolve_base
from qlorakit.models.generation import _whole_characters


def test_a_character_cut_by_max_tokens_is_dropped_not_replaced():
    tok = load_tokenizer(resolve_base("default")[0])
    text = "日本語のテキスト🙂 and \ufffd kept"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut_inside = 0
    for k in range(1, len(ids) + 1):
        raw = tok.decode(ids[:k])
        out = _whole_characters(tok, ids[:k], raw)
        assert text.startswith(out), (k, raw, out)  # never a replacement character the text does not hold
        cut_inside += raw.endswith("\ufffd") and raw != out
    assert cut_inside >= 5  # the multi-byte characters were cut inside, and each cut was mended
    assert _whole_characters(tok, ids, tok.decode(ids)) == text  # the one inside the text stays
