"""Done-when 1: the official ``openai`` client lists the models, gets chat and completion answers
from a chosen adapter, and streams tokens; answers match the adapter loaded on its own."""

from __future__ import annotations

import pytest

from serve_support import KEYS

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You answer for Fernhill Cycles."},
            {"role": "user", "content": "How long does delivery of a bike take?"}]


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.v1, api_key=KEYS["alice"], max_retries=0, timeout=120)


def _reference(run_dir, messages=None, prompt=None, max_tokens=6):
    """Greedy answer of the run loaded on its own (load_run), without the server."""
    from qlorakit.models import chat_prompt, generate
    from qlorakit.train import load_run

    loaded, _ = load_run(run_dir)
    text = prompt if prompt is not None else chat_prompt(loaded.tokenizer, messages)
    return generate(loaded.model, loaded.tokenizer, text, max_new_tokens=max_tokens, temperature=0.0)


def test_models_lists_base_and_each_adapter(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["base", "support", "tone"]
    assert {m.owned_by for m in models.data} == {"qlorakit"}
    assert client.models.retrieve("tone").id == "tone"


def test_chat_answer_from_a_chosen_adapter_matches_the_run_loaded_alone(client, runs):
    out = client.chat.completions.create(model="tone", messages=MESSAGES, max_tokens=6, temperature=0)
    ref = _reference(runs["tone"], MESSAGES)
    assert out.object == "chat.completion" and out.model == "tone"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.prompt_tokens
    assert out.usage.completion_tokens == ref.completion_tokens
    assert out.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens
    assert out.id.startswith("chatcmpl-")


def test_adapters_and_base_answer_differently_and_switching_back_is_exact(client):
    def ask(model):
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)

    first = {m: ask(m).choices[0].message.content for m in ("support", "tone", "base")}
    assert len(set(first.values())) == 3, first  # each adapter changes the answer
    # switch in another order: every model gives the same answer again
    for m in ("base", "tone", "support", "tone"):
        assert ask(m).choices[0].message.content == first[m]


def test_base_model_id_is_the_base_without_adapter(client, tiny_model_dir):
    from qlorakit.config import ModelConfig
    from qlorakit.models import chat_prompt, generate, load_base_model

    loaded = load_base_model(ModelConfig(base=str(tiny_model_dir)))
    ref = generate(loaded.model, loaded.tokenizer, chat_prompt(loaded.tokenizer, MESSAGES), max_new_tokens=6)
    out = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=6, temperature=0)
    assert out.choices[0].message.content == ref.text


def test_text_completion_from_an_adapter(client, runs):
    prompt = "Our opening hours are"
    out = client.completions.create(model="support", prompt=prompt, max_tokens=5, temperature=0)
    ref = _reference(runs["support"], prompt=prompt, max_tokens=5)
    assert out.object == "text_completion"
    assert out.choices[0].text == ref.text
    assert out.usage.prompt_tokens == ref.prompt_tokens
    assert out.usage.completion_tokens == ref.completion_tokens


def test_chat_stream_yields_chunks_that_add_up_to_the_answer(client):
    full = client.chat.completions.create(model="support", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="support", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "expected the answer in several pieces"
    assert "".join(pieces) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_stream(client):
    full = client.completions.create(model="tone", prompt="Bikes are", max_tokens=10, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(model="tone", prompt="Bikes are", max_tokens=10,
                                                                   temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].text


def test_sampling_params_seed_stop_top_p(client):
    kw = dict(model="support", messages=MESSAGES, max_tokens=12, temperature=1.2, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b and a != c  # the seed fixes sampling
    # a stop string cuts the answer before it, and finishes with "stop"
    greedy = client.chat.completions.create(model="support", messages=MESSAGES, max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    cut = client.chat.completions.create(model="support", messages=MESSAGES, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # max_tokens bounds the answer
    short = client.chat.completions.create(model="support", messages=MESSAGES, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason == "length"


def test_stream_and_plain_answers_count_the_same_tokens_and_finish_the_same(client):
    """The stream reports the tokens the generation made and why it ended, as the plain answer
    does, for sampled answers cut by max_tokens or by a stop string."""
    seen = set()
    for seed in range(6):
        for max_tokens, stop in ((5, None), (24, None), (24, ["e", "a"])):
            kw = dict(model="support", messages=MESSAGES, max_tokens=max_tokens, temperature=1.3, seed=seed, stop=stop)
            full = client.chat.completions.create(**kw)
            chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert text == full.choices[0].message.content
            assert finish == [full.choices[0].finish_reason]
            assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens <= max_tokens
            if full.choices[0].finish_reason == "length":
                assert full.usage.completion_tokens == max_tokens
            seen.add(full.choices[0].finish_reason)
    assert seen == {"stop", "length"}


def test_a_stop_string_ends_the_generation_and_only_its_tokens_count(client):
    kw = dict(model="support", messages=MESSAGES, temperature=0)
    whole = client.chat.completions.create(max_tokens=24, **kw)
    text = whole.choices[0].message.content
    assert whole.usage.completion_tokens >= 8, text
    stop = text[8:10]
    assert stop.strip() and text.find(stop) >= 4, text
    plain = client.chat.completions.create(max_tokens=24, stop=[stop], **kw)
    streamed = list(client.chat.completions.create(max_tokens=24, stop=[stop], stream=True,
                                                   stream_options={"include_usage": True}, **kw))
    assert plain.choices[0].message.content == text[:text.find(stop)]
    assert plain.choices[0].finish_reason == "stop"
    # the tokens up to the one that completes the stop string: fewer than the whole answer's
    assert plain.usage.completion_tokens < whole.usage.completion_tokens
    assert streamed[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_a_seeded_request_leaves_unseeded_sampling_random(client):
    """A seed fixes its own request only: the answers that follow it without a seed differ."""
    kw = dict(model="support", messages=MESSAGES, max_tokens=12, temperature=1.3)
    after = []
    for _ in range(3):
        client.chat.completions.create(seed=7, **kw)
        after.append(client.chat.completions.create(**kw).choices[0].message.content)
    assert len(set(after)) == 3, after
