import torch

from qlorakit.eval.generation import chat_prompt, greedy_generate, truncate_at_stop


class PlainModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def _manual_greedy(model, tokenizer, prompt, n):
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_batched_hf_generate_matches_manual_greedy_and_plain_model(tiny_llama, tiny_tokenizer):
    prompts = [chat_prompt(tiny_tokenizer, "What is the capital of France?"), chat_prompt(tiny_tokenizer, "Hi"),
               "The quick brown fox"]
    expected = [_manual_greedy(tiny_llama, tiny_tokenizer, p, 6) for p in prompts]
    assert greedy_generate(tiny_llama, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3, precision="fp32") == expected
    assert greedy_generate(PlainModel(tiny_llama), tiny_tokenizer, prompts, max_new_tokens=6, precision="fp32") == expected


def test_stop_strings_cut_output(tiny_llama, tiny_tokenizer):
    prompt = "The quick brown fox"
    full = greedy_generate(tiny_llama, tiny_tokenizer, [prompt], max_new_tokens=8, precision="fp32")[0]
    if len(full) >= 2:
        stop = full[1:3] if full[1:3].strip() else full[1]
        cut = greedy_generate(tiny_llama, tiny_tokenizer, [prompt], max_new_tokens=8, stop=[stop], precision="fp32")[0]
        assert cut == truncate_at_stop(full, [stop]).strip()
    assert truncate_at_stop("answer\nQ: next", ["\nQ:", "zzz"]) == "answer"
    assert truncate_at_stop("plain", []) == "plain"


def test_chat_prompt_uses_template(tiny_tokenizer):
    text = chat_prompt(tiny_tokenizer, "Hello", system="Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
