"""The fast decoder computes what transformers' ``generate`` computes on the same modules, with
bitsandbytes' inference path as it runs on this CPU (its packed AVX512-BF16 kernel where the CPU has
it): the same logits bit for bit, the same greedy and seeded sampled tokens, with an adapter on,
off and switched; the model's own weights and quantization state are left as they were."""

from __future__ import annotations

import pytest
import torch

from qlorakit.config import LoraConfig, load_recipe
from qlorakit.lora import adapters_disabled, attach_lora, lora_parameters
from qlorakit.models import generate, generate_stream, load_base_model
from qlorakit.models.decode import PACKED_MAX_ROWS, Decoder, _GreedyHead, decoder_for
from qlorakit.quant import is_linear4bit

PROMPT = "The shop opens at nine on weekdays and"


def _loaded(model_dir, seed: int = 0):
    loaded = load_base_model(load_recipe(None, [f"model.base={model_dir}", "model.compute_dtype=bf16"]).model)
    attach_lora(loaded.model, LoraConfig(r=8, alpha=16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(loaded.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    loaded.model.eval()
    return loaded


def _reference(model_dir, seed: int = 0):
    """The same model run as transformers + bitsandbytes run it for inference on this CPU."""
    from bitsandbytes.functional import has_avx512bf16

    ref = _loaded(model_dir, seed)
    for m in ref.model.modules():
        if is_linear4bit(m):
            m.support_avx512bf16_for_cpu = bool(has_avx512bf16())
    return ref


def _hf_tokens(loaded, prompt: str, n: int, **kw) -> list[int]:
    enc = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, pad_token_id=loaded.tokenizer.pad_token_id,
                                    **kw)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _ids(loaded, prompt: str) -> list[int]:
    return loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    return _loaded(tiny_model_dir), _reference(tiny_model_dir)


def test_logits_are_those_of_the_reference_bit_for_bit(pair):
    ours, ref = pair
    dec = Decoder(ours.model)
    ids = _ids(ours, PROMPT)
    enc = ref.tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():  # as generate runs the prompt: the head on the last position only
        want = ref.model(**enc, use_cache=False, logits_to_keep=1).logits[0, -1]
    cache = [(torch.empty(dec.n_kv, len(ids) + 1, dec.d), torch.empty(dec.n_kv, len(ids) + 1, dec.d)) for _ in dec.layers]
    cos, sin = dec.rotary(torch.empty(1, 1, 1), torch.arange(len(ids) + 1).unsqueeze(0))
    for grp in dec.groups:
        grp.refresh()
    with torch.inference_mode():
        h = dec._forward(torch.tensor(ids), 0, cache, cos, sin)
        got = torch.nn.functional.linear(h, dec.head)[0]
    assert torch.equal(got, want)


def test_greedy_and_sampled_tokens_match_generate_with_the_adapter_on_and_off(pair):
    ours, ref = pair
    dec = decoder_for(ours.model)
    assert dec is not None
    want = _hf_tokens(ref, PROMPT, 24, do_sample=False)
    assert list(dec.tokens(_ids(ours, PROMPT), 24, min_new_tokens=24, stop_ids=[ours.tokenizer.eos_token_id])) == want
    with adapters_disabled(ours.model), adapters_disabled(ref.model):
        base = _hf_tokens(ref, PROMPT, 24, do_sample=False)
        assert list(dec.tokens(_ids(ours, PROMPT), 24, min_new_tokens=24,
                               stop_ids=[ours.tokenizer.eos_token_id])) == base
    assert base != want  # the adapter changes the output, so the comparison means something
    # sampling: temperature then top-p, the same random stream
    torch.manual_seed(7)
    sampled = _hf_tokens(ref, PROMPT, 16, do_sample=True, temperature=0.8, top_p=0.9, top_k=0)
    torch.manual_seed(7)
    assert list(dec.tokens(_ids(ours, PROMPT), 16, min_new_tokens=16, temperature=0.8, top_p=0.9,
                           stop_ids=[ours.tokenizer.eos_token_id])) == sampled
    # through the public API: the same text as transformers' generate decodes
    res = generate(ours.model, ours.tokenizer, PROMPT, max_new_tokens=24, min_new_tokens=24)
    assert res.text == ours.tokenizer.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "llama3-rope"])
def test_greedy_tokens_match_generate_on_other_architectures(arch, tmp_path, tiny_model_factory):
    model_dir = tiny_model_factory(tmp_path / arch, arch=arch)
    ours, ref = _loaded(model_dir), _reference(model_dir)
    dec = decoder_for(ours.model)
    assert dec is not None
    want = _hf_tokens(ref, PROMPT, 24, do_sample=False)
    assert list(dec.tokens(_ids(ours, PROMPT), 24, min_new_tokens=24, stop_ids=[ours.tokenizer.eos_token_id])) == want


def test_switched_adapter_is_read_at_each_generation(tiny_model_dir):
    ours, ref = _loaded(tiny_model_dir, seed=0), _reference(tiny_model_dir, seed=1)
    first = generate(ours.model, ours.tokenizer, PROMPT, max_new_tokens=12, min_new_tokens=12).text
    with torch.no_grad():  # load the other adapter's values into the same layers, as the server does
        for p, q in zip(lora_parameters(ours.model), lora_parameters(ref.model)):
            p.copy_(q)
    second = generate(ours.model, ours.tokenizer, PROMPT, max_new_tokens=12, min_new_tokens=12).text
    assert second != first
    assert second == ref.tokenizer.decode(_hf_tokens(ref, PROMPT, 12, do_sample=False), skip_special_tokens=True)


def test_long_prompt_takes_the_bf16_path_and_stays_close(pair):
    ours, ref = pair
    prompt = " ".join(["The shop opens at nine on weekdays and closes at six."] * 12)
    ids = _ids(ours, prompt)
    assert len(ids) > PACKED_MAX_ROWS
    res = generate(ours.model, ours.tokenizer, prompt, max_new_tokens=4, min_new_tokens=4)
    assert res.prompt_tokens == len(ids) and res.completion_tokens == 4
    dec = decoder_for(ours.model)
    cache = [(torch.empty(dec.n_kv, len(ids), dec.d), torch.empty(dec.n_kv, len(ids), dec.d)) for _ in dec.layers]
    cos, sin = dec.rotary(torch.empty(1, 1, 1), torch.arange(len(ids)).unsqueeze(0))
    enc = ref.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        h = dec._forward(torch.tensor(ids), 0, cache, cos, sin)
        got = torch.nn.functional.linear(h, dec.head)[0]
        want = ref.model(**enc, use_cache=False).logits[0, -1]
    # bf16 products of the same 4-bit weights, rounded differently from the packed kernel
    assert torch.allclose(got, want, atol=2e-2 * want.abs().max().item())


def test_model_state_is_untouched(tiny_model_dir):
    loaded = _loaded(tiny_model_dir)
    q4 = [m for m in loaded.model.modules() if is_linear4bit(m)]
    before = {k: v.clone() for k, v in loaded.model.state_dict().items() if isinstance(v, torch.Tensor)}
    absmax = [m.weight.quant_state.absmax.clone() for m in q4]
    generate(loaded.model, loaded.tokenizer, PROMPT, max_new_tokens=6)
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in q4)
    assert all(torch.equal(a, m.weight.quant_state.absmax) for a, m in zip(absmax, q4))
    after = loaded.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_greedy_head_agrees_with_the_full_product_and_declines_ties():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 64, generator=g) * 0.1
    w[4321] = w[17]  # two identical rows: an exact tie whenever they lead
    head = _GreedyHead(w)
    decided = 0
    for i in range(200):
        h = torch.randn(1, 64, generator=g) * (1 + i % 5)
        if i % 10 == 0:
            h = w[17:18] * 40  # row 17 (and its twin) lead by far
        full = torch.nn.functional.linear(h, w)[0]
        got = head.pick(h, None)
        if got is not None:
            decided += 1
            assert got == int(torch.argmax(full))
        if i % 10 == 0:
            assert got is None  # the tie between 17 and 4321 is left to the full product
        banned = torch.tensor([int(torch.argmax(full))])
        got = head.pick(h, banned)
        masked = full.clone()
        masked[banned] = -float("inf")
        assert got is None or got == int(torch.argmax(masked))
    assert decided >= 150  # it decides nearly always; the fallback is for near-ties only


def test_stream_joins_to_the_generated_text_and_holds_back_stop_strings(pair):
    ours, _ = pair
    full = generate(ours.model, ours.tokenizer, PROMPT, max_new_tokens=20, min_new_tokens=20).text
    pieces = list(generate_stream(ours.model, ours.tokenizer, PROMPT, max_new_tokens=20))
    assert "".join(pieces) == generate(ours.model, ours.tokenizer, PROMPT, max_new_tokens=20).text
    assert len(pieces) > 1
    stop = full[len(full) // 2: len(full) // 2 + 3]
    if stop.strip():
        text = "".join(generate_stream(ours.model, ours.tokenizer, PROMPT, max_new_tokens=20, stop=[stop]))
        assert text == full[:full.find(stop)] and stop not in text
