"""Stopping a generation early: ``generate(cancel=...)`` ends after the token in progress, on the fast
decoder and on transformers' ``generate``; closing ``generate_stream`` ends its generation before
``close()`` returns (the server relies on both when a client leaves)."""

from __future__ import annotations

import threading
import time

import pytest

from qlorakit.config import load_recipe
from qlorakit.models import generate, generate_stream, load_base_model
from qlorakit.models import generation as generation_mod

PROMPT = "The shop opens at nine on weekdays and"


class SetAfter(threading.Event):
    """An event that reads as set from its ``n``-th check on (a client that leaves mid-answer)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.checks = n, 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n or super().is_set()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_base_model(load_recipe(None, [f"model.base={tiny_model_dir}", "model.compute_dtype=bf16"]).model)


@pytest.fixture(params=["decoder", "transformers"])
def path(request, monkeypatch):
    if request.param == "transformers":  # the path of models the fast decoder does not run
        monkeypatch.setattr(generation_mod, "decoder_for", lambda model: None)
    return request.param


def test_generate_stops_after_the_token_in_progress_when_cancelled(loaded, path):
    full = generate(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens=20, min_new_tokens=20)
    assert full.completion_tokens == 20 and full.finish_reason == "length"
    cut = generate(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens=20, min_new_tokens=20, cancel=SetAfter(6))
    assert cut.finish_reason == "cancelled"
    assert cut.completion_tokens == 6
    assert full.text.startswith(cut.text) and len(cut.text) < len(full.text)
    # an event that is never set changes nothing
    same = generate(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens=20, min_new_tokens=20,
                    cancel=threading.Event())
    assert (same.text, same.completion_tokens, same.finish_reason) == (full.text, 20, "length")


def test_closing_a_stream_ends_its_generation_before_close_returns(loaded, path, monkeypatch):
    made: list[int] = []
    if path == "transformers":  # count the steps transformers' generate takes, in its own thread
        real = loaded.model.forward

        def counted(*a, **kw):
            made.append(1)
            return real(*a, **kw)

        monkeypatch.setattr(loaded.model, "forward", counted)
    before = threading.active_count()
    gen = generate_stream(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens=400)
    first = next(gen)
    assert first
    gen.close()
    assert threading.active_count() == before  # no generating thread is left running
    if path == "transformers":
        steps = len(made)
        time.sleep(0.3)
        assert len(made) == steps < 400  # and nothing more is computed afterwards
