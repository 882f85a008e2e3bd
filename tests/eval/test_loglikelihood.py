"""The multiple-choice scorer against a direct log_softmax computation on a tiny Llama."""

import pytest
import torch
import torch.nn.functional as F

from qlorakit.eval.loglikelihood import LoglikelihoodScorer, encode_pair
from qlorakit.eval.metrics import mc_acc


class PlainModel(torch.nn.Module):
    """Only the plain interface: input_ids/attention_mask in, .logits out (no cache)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def _direct(model, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
    return sum(float(logprobs[len(ctx_ids) - 1 + k, t]) for k, t in enumerate(cont_ids))


def test_encode_pair_moves_trailing_space_and_splits_joint_encoding(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "The quick brown ", "fox")
    assert ctx == tiny_tokenizer.encode("The quick brown")
    whole = tiny_tokenizer.encode("The quick brown fox")
    assert ctx + cont == whole
    # no trailing space: continuation tokens are the joint encoding past the context's
    ctx2, cont2 = encode_pair(tiny_tokenizer, "Question: what is", " the capital")
    assert ctx2 + cont2 == tiny_tokenizer.encode("Question: what is the capital")
    with pytest.raises(ValueError):
        encode_pair(tiny_tokenizer, "x", "")


@pytest.mark.parametrize("strategy", ["auto", "shared_prefix", "concat"])
def test_scores_match_direct_log_softmax(tiny_llama, tiny_tokenizer, strategy):
    items = [
        ("A man is sitting on a roof. He", [" starts pulling up roofing.", " is a dog.", " jumps"]),
        ("Question: what is the capital of France? Answer:", [" Paris", " the lazy dog", " A"]),
        ("The quick", [" brown fox jumps over the lazy dog.", " b"]),
    ]
    scorer = LoglikelihoodScorer(tiny_llama, tiny_tokenizer, precision="fp32", strategy=strategy, batch_tokens=64)
    got = scorer.score_many(items)
    for (context, conts), scores in zip(items, got):
        for cont, s in zip(conts, scores):
            c_ids, k_ids = encode_pair(tiny_tokenizer, context, cont)
            assert s.n_tokens == len(k_ids)
            assert s.logprob == pytest.approx(_direct(tiny_llama, c_ids, k_ids), abs=1e-4)
    if strategy == "auto":
        assert scorer.strategy == "shared_prefix"


def test_plain_model_falls_back_to_concat(tiny_llama, tiny_tokenizer):
    plain = PlainModel(tiny_llama)
    scorer = LoglikelihoodScorer(plain, tiny_tokenizer, precision="fp32")
    (scores,) = scorer.score_many([("Email: please pay", [" 25 dollars", " David by Friday."])])
    assert scorer.strategy == "concat"
    for cont, s in zip([" 25 dollars", " David by Friday."], scores):
        c_ids, k_ids = encode_pair(tiny_tokenizer, "Email: please pay", cont)
        assert s.logprob == pytest.approx(_direct(tiny_llama, c_ids, k_ids), abs=1e-4)


def test_acc_from_scorer_matches_hand_argmax(tiny_llama, tiny_tokenizer):
    context = "The quick brown"
    choices = ["fox jumps", "dog", "roof. He starts"]
    scores = LoglikelihoodScorer(tiny_llama, tiny_tokenizer, precision="fp32").score(context, [" " + c for c in choices])
    lls = [s.logprob for s in scores]
    direct = [_direct(tiny_llama, *encode_pair(tiny_tokenizer, context, " " + c)) for c in choices]
    best = max(range(3), key=lambda i: direct[i])
    best_norm = max(range(3), key=lambda i: direct[i] / len(choices[i]))
    assert mc_acc(lls, choices, best) == (1.0, float(best == best_norm))
    assert mc_acc(lls, choices, best_norm)[1] == 1.0


def test_bf16_close_to_fp32(tiny_llama, tiny_tokenizer):
    items = [("A man is sitting on a roof. He", [" starts pulling up roofing.", " is a dog."])]
    fp32 = LoglikelihoodScorer(tiny_llama, tiny_tokenizer, precision="fp32").score_many(items)[0]
    bf16 = LoglikelihoodScorer(tiny_llama, tiny_tokenizer, precision="bf16").score_many(items)[0]
    for a, b in zip(fp32, bf16):
        assert b.logprob == pytest.approx(a.logprob, rel=0.05, abs=0.5)


def test_long_context_is_left_truncated(tiny_llama, tiny_tokenizer):
    scorer = LoglikelihoodScorer(tiny_llama, tiny_tokenizer, precision="fp32", max_length=8)
    ctx = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    cont = tiny_tokenizer.encode(" Paris")
    (s,) = scorer.score_tokens(ctx, [cont])
    keep = ctx[-(8 - (len(cont) - 1)):]
    assert s.logprob == pytest.approx(_direct(tiny_llama, keep, cont), abs=1e-4)


class WidthRecorder(torch.nn.Module):
    """The tiny model behind the full interface, recording the width and last position of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.seen = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        if position_ids is None:
            past = 0 if past_key_values is None else past_key_values.get_seq_length()
            last = past + input_ids.shape[1] - 1
        else:
            last = int(position_ids.max())
        self.seen.append((input_ids.shape[1], last))
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache)


@pytest.mark.parametrize("strategy", ["shared_prefix", "concat"])
def test_padded_widths_are_rounded_within_max_length(tiny_llama, tiny_tokenizer, strategy):
    """Every forward's width is rounded up to its step (a few widths per doubling, so oneDNN meets a
    few matmul shapes, not one per length), no padded position passes max_length, and the scores stay
    the unpadded ones."""
    from qlorakit.eval.loglikelihood import width_step

    items = [("A man is sitting on a roof. He", [" starts pulling up roofing.", " is a dog."]),
             ("Question: what is the capital of France? Answer:", [" Paris", " the lazy dog"]),
             ("The quick brown fox jumps over the lazy dog. " * 3, [" b", " brown fox jumps"]),
             ("Once upon a time there was a small shop by the river. " * 6, [" It sold bread.", " The end"])]
    assert [width_step(n, 16) for n in (7, 20, 45, 100, 300)] == [1, 2, 4, 8, 16]
    for max_length, multiple in ((256, 16), (40, 16)):
        rec = WidthRecorder(tiny_llama)
        scorer = LoglikelihoodScorer(rec, tiny_tokenizer, precision="fp32", strategy=strategy, batch_tokens=4096,
                                     width_multiple=multiple, max_length=max_length)
        got = scorer.score_many(items)
        assert rec.seen and all(last < max_length for _, last in rec.seen), rec.seen
        if max_length == 256:  # room everywhere: every width rounded
            assert all(w % width_step(w, multiple) == 0 for w, _ in rec.seen), rec.seen
            assert any(w >= 64 for w, _ in rec.seen), rec.seen  # steps of 8 and more were met
        plain = LoglikelihoodScorer(tiny_llama, tiny_tokenizer, precision="fp32", strategy=strategy,
                                    width_multiple=1, max_length=max_length).score_many(items)
        for a, b in zip(got, plain):
            for x, y in zip(a, b):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4) and x.is_greedy == y.is_greedy
    with pytest.raises(ValueError, match="width_multiple"):
        LoglikelihoodScorer(tiny_llama, tiny_tokenizer, width_multiple=0)
