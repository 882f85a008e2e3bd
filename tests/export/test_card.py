"""The model card's export section: rewritten between markers, the rest of the card untouched."""

from __future__ import annotations

import pytest

from qlorakit.export import ExportError
from qlorakit.export.card import END, START, record_export, replace_section


def test_section_appended_then_replaced():
    card = "# Model card\n\nTraining text.\n"
    once = replace_section(card, "## Exports\nA\n")
    assert once.startswith(card.rstrip("\n")) and once.count(START) == 1 and "A" in once
    twice = replace_section(once + "\nTrailing text.\n", "## Exports\nB\n")
    assert twice.count(START) == 1 and "B" in twice and "\nA\n" not in twice
    assert "Training text." in twice and "Trailing text." in twice
    assert replace_section(twice, "## Exports\nB\n") == twice


def test_broken_markers_are_an_error():
    with pytest.raises(ExportError, match="markers"):
        replace_section(f"x\n{END}\ny\n{START}\n", "s")


def _entry(out, loss):
    return {"out": out, "format": "gguf", "status": "passed", "parity": [
        {"artifact": "GGUF q8_0 (merged)", "runtime": "llama.cpp", "token_agreement": 0.97, "agreement_tokens": 32,
         "prompts": 8, "source_loss": 1.0, "export_loss": loss, "loss_increase": loss - 1.0,
         "stops": {"same": 5, "source_stopped": 5}, "passed": True}],
        "on_device": {"items": [{"what": "exported model-q8_0.gguf", "files": {"model-q8_0.gguf": 145_000_000},
                                 "measured": {"runtime": "llama.cpp", "peak_rss_mb": 300.0, "tokens_per_s": 80.5,
                                              "load_average": 1.2}}]}}


def test_record_export_keeps_one_entry_per_output(tmp_path):
    (tmp_path / "MODEL_CARD.md").write_text("# Model card\n\nBody.\n")
    record_export(tmp_path, _entry("/x/a", 1.01))
    record_export(tmp_path, _entry("/x/b", 1.02))
    record_export(tmp_path, _entry("/x/a", 1.03))
    text = (tmp_path / "MODEL_CARD.md").read_text()
    assert text.startswith("# Model card\n\nBody.\n")
    assert "1.0000 -> 1.0300" in text and "1.0000 -> 1.0100" not in text and "1.0000 -> 1.0200" in text
    assert "145.0 MB" in text and "300 MB" in text and "80.5" in text
