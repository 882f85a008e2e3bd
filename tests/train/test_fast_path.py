"""The fast CPU path computes the same losses and LoRA gradients as the plain path.

Both run bf16 matmuls, so neither equals exact arithmetic; an fp32 run of the plain path is the
reference. Stated tolerances, on a tiny Llama with an NF4 base, GQA, packed rows and a padding tail:

- loss: the fast path within 2e-3 (relative) of the plain path;
- gradients: for every LoRA tensor, |g_fast - g_plain| / |g_plain| <= 5e-2, over all tensors at once
  <= 2e-2; and the fast path's distance to the fp32 reference at most 1.5x the plain path's + 1e-2.

The pieces (fused head loss, segment attention, weight modes, compiled kernels) are checked
against reference implementations on their own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlorakit.config import LoraConfig
from qlorakit.lora import adapters_disabled, attach_lora, lora_parameters
from qlorakit.quant import is_linear4bit, quantize_decoder_linears
from qlorakit.train.attention import _fused_segments, segment_attention, segments_from_positions
from qlorakit.train.fast import FastModel, FastOptions, FastUnsupported, fast_supported, fused_head_loss
from qlorakit.train.loss import plain_loss

PAD = 2
VOCAB = 300


def _tiny(dropout: float = 0.0, seed: int = 0, kv_heads: int = 2, device: str = "cpu", hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg).to(device)
    quantize_decoder_linears(model, compute_dtype=torch.bfloat16)
    model.config.use_cache = False
    attach_lora(model, LoraConfig(r=8, alpha=16, dropout=dropout))
    for p in lora_parameters(model):  # B is zero at initialisation: give the adapter an effect
        torch.nn.init.normal_(p, std=0.05)
        p.requires_grad_(True)
    model.train()
    return model


def _batch(pad_tail: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b, t = 2, 48
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(18), torch.arange(10)]).repeat(b, 1)
    labels = ids.clone()
    labels[pos == 0] = -100
    labels[0, 5:12] = -100  # a prompt part without loss
    if pad_tail:
        ids[1, 38:] = PAD
        labels[1, 38:] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _grads(model, fn, batch, *, autocast: bool = True, seed: int = 7) -> tuple[float, int, list[torch.Tensor]]:
    params = lora_parameters(model)
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    with torch.autocast(params[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        s, n = fn(model, batch)
    (s / n).backward()
    return float(s.detach()), n, [p.grad.detach().clone() for p in params]


def _fp32_reference(model, batch) -> tuple[float, list[torch.Tensor]]:
    mods = [m for m in model.modules() if is_linear4bit(m)]
    for m in mods:
        m.compute_dtype = torch.float32
    try:
        s, _, g = _grads(model, plain_loss, batch, autocast=False)
    finally:
        for m in mods:
            m.compute_dtype = torch.bfloat16
    return s, g


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _assert_close(fast, plain, ref=None):
    (sf, nf, gf), (sp, np_, gp) = fast, plain
    assert nf == np_
    assert abs(sf - sp) / abs(sp) <= 2e-3, (sf, sp)
    per = [_rel(a, b) for a, b in zip(gf, gp)]
    assert max(per) <= 5e-2, max(per)
    assert _rel(torch.cat([g.flatten() for g in gf]), torch.cat([g.flatten() for g in gp])) <= 2e-2
    if ref is not None:
        gr = torch.cat([g.flatten() for g in ref[1]])
        e_fast = _rel(torch.cat([g.flatten() for g in gf]), gr)
        e_plain = _rel(torch.cat([g.flatten() for g in gp]), gr)
        assert e_fast <= 1.5 * e_plain + 1e-2, (e_fast, e_plain)


@pytest.mark.parametrize("kv_heads,hidden", [(2, 64), (4, 64), (2, 128)])
def test_fast_path_matches_plain_path_losses_and_gradients(kv_heads, hidden):
    """Head size 16, and 32 (where the AMX attention runs on CPUs that have it)."""
    model = _tiny(kv_heads=kv_heads, hidden=hidden)
    batch = _batch(pad_tail=True)
    plain = _grads(model, plain_loss, batch)
    fast = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch)
    ref = _fp32_reference(model, batch)
    _assert_close(fast, plain, ref)
    # without padding-tail removal the answer is the same
    fast_all = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=None), batch)
    _assert_close(fast_all, plain)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("compiled", [False, True])
def test_fp32_fast_path_matches_plain_fp32_path(dropout, compiled):
    """On CPUs without bf16 instructions both paths compute in fp32: the fast path then agrees with
    the plain path to fp32 rounding (loss within 1e-5, every LoRA gradient within 1e-4 relative),
    with the padding tail dropped, dropout and the compiled kernels (the eager ones where no C++
    compiler is there)."""
    model = _tiny(dropout=dropout)
    for m in model.modules():
        if is_linear4bit(m):
            m.compute_dtype = torch.float32  # as the loader quantizes on such a CPU
    batch = _batch(pad_tail=True)
    plain = _grads(model, plain_loss, batch, autocast=False)
    fm = FastModel(model, FastOptions(compile=compiled, dtype=torch.float32), pad_token_id=PAD)
    fast = _grads(model, fm, batch, autocast=False)
    assert fm.layers[0].qkv.weight.get().dtype == torch.float32
    (sf, nf, gf), (sp, np_, gp) = fast, plain
    assert nf == np_
    assert abs(sf - sp) / abs(sp) <= 1e-5, (sf, sp)
    per = [_rel(a, b) for a, b in zip(gf, gp)]
    assert max(per) <= 1e-4, max(per)
    # and the same model in bf16 is measurably further away: the check can tell the dtypes apart
    fast16 = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch, autocast=False)
    assert max(_rel(a, b) for a, b in zip(fast16[2], gp)) > 1e-3


def _tiny_arch(kind: str, arch_model):
    """A tiny quantized model with LoRA of another architecture the fast path implements (see
    ``arch_model`` in conftest: Qwen2's biases and untied head, Mistral, Llama 3's rope)."""
    torch.manual_seed(0)
    model = arch_model(kind, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=PAD)
    quantize_decoder_linears(model, compute_dtype=torch.bfloat16)
    model.config.use_cache = False
    attach_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
        p.requires_grad_(True)
    model.train()
    return model


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama3-rope"])
def test_fast_path_matches_plain_path_on_other_architectures(kind, arch_model_factory):
    model = _tiny_arch(kind, arch_model_factory)
    assert fast_supported(model) is None
    batch = _batch(pad_tail=True)
    plain = _grads(model, plain_loss, batch)
    fast = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch)
    _assert_close(fast, plain, _fp32_reference(model, batch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fast_path_matches_plain_path_on_cuda(kv_heads):
    """The fast path run on a GPU (bitsandbytes' CUDA dequantization, fused per-segment attention)
    against the plain path there, with the same tolerances as on the CPU."""
    model = _tiny(kv_heads=kv_heads, device="cuda")
    assert all(m.weight.device.type == "cuda" for m in model.modules() if is_linear4bit(m))
    batch = {k: v.cuda() for k, v in _batch(pad_tail=True).items()}
    plain = _grads(model, plain_loss, batch)
    for mode in ("cache", "per-use"):
        fast = _grads(model, FastModel(model, FastOptions(weights=mode, compile=False), pad_token_id=PAD), batch)
        _assert_close(fast, plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_path_with_dropout_matches_plain_path_on_cuda():
    """On a GPU both paths take the generator mask (the device's generator seeded with each key):
    the same masks, so the same losses and gradients within the CPU test's tolerances."""
    model = _tiny(dropout=0.1, device="cuda")
    batch = {k: v.cuda() for k, v in _batch(pad_tail=False).items()}
    plain = _grads(model, plain_loss, batch, seed=11)
    fast = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch, seed=11)
    _assert_close(fast, plain)
    other = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch, seed=12)
    assert other[0] != fast[0]


def test_fast_path_with_dropout_draws_the_same_masks_as_the_plain_path():
    model = _tiny(dropout=0.1)
    batch = _batch(pad_tail=False)  # the same token count, so the same random draws
    plain = _grads(model, plain_loss, batch, seed=11)
    fast = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch, seed=11)
    _assert_close(fast, plain)
    other = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch, seed=12)
    assert other[0] != fast[0]  # dropout is really on: another seed, another loss


def test_fast_and_plain_paths_share_masks_with_the_generator_mask(monkeypatch):
    """Off the CPU both paths take the generator mask; with it forced here, the fast path's losses
    and gradients under dropout still match the plain path's, mask for mask."""
    import qlorakit.lora.dropout as D

    monkeypatch.setattr(D, "_use_hash", lambda x: False)
    model = _tiny(dropout=0.1)
    batch = _batch(pad_tail=False)
    plain = _grads(model, plain_loss, batch, seed=11)
    fast = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch, seed=11)
    _assert_close(fast, plain)
    monkeypatch.setattr(D, "_use_hash", lambda x: True)
    hashed = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch, seed=11)
    assert hashed[0] != fast[0]  # the two mask generators really differ


def test_fast_path_is_deterministic_and_checkpointing_gives_the_same_gradients():
    model = _tiny(dropout=0.1)
    batch = _batch()
    fm = FastModel(model, FastOptions(compile=False), pad_token_id=PAD)
    a, b = _grads(model, fm, batch), _grads(model, fm, batch)
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    ck = _grads(model, FastModel(model, FastOptions(compile=False, checkpointing=True), pad_token_id=PAD), batch)
    assert ck[0] == a[0] and all(torch.equal(x, y) for x, y in zip(ck[2], a[2]))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_frees_each_layers_inputs_once_past_it(monkeypatch, checkpointing):
    """The inputs a layer's linears saved are freed once the backward has gone past that layer, not
    kept to the end of the pass (with recomputation that would keep every layer's recomputed
    activations at once: measured +0.8 GB at 4 x 1024 tokens on the packaged model)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    import qlorakit.quant.fast_linear as fl
    import qlorakit.train.fast as fast_mod

    model = _tiny()
    batch = _batch()
    fm = FastModel(model, FastOptions(compile=False, checkpointing=checkpointing), pad_token_id=PAD)
    seen: list[tuple[int, StorageWeakRef]] = []  # (layer, memory of an input of one of its linear groups)
    layer_of = {id(g): i for i, L in enumerate(fm.layers) for g in (L.qkv, L.o, L.gu, L.down)}

    original = fl.group_forward

    def recording(x, group, training, params):
        seen.append((layer_of[id(group)], StorageWeakRef(x.untyped_storage())))
        return original(x, group, training, params)

    monkeypatch.setattr(fl, "group_forward", recording)
    monkeypatch.setattr(fast_mod, "group_forward", recording)
    alive_at_layer0: list[list[int]] = []
    a0 = model.model.layers[0].self_attn.q_proj.lora_A.weight  # its gradient comes last of all
    a0.register_hook(lambda g: alive_at_layer0.append(sorted({i for i, r in seen if not r.expired() and i > 0})))
    s, n = fm(model, batch)
    (s / n).backward()
    assert alive_at_layer0 == [[]], f"inputs of layers {alive_at_layer0} still alive when layer 0's backward ran"


def test_recomputation_gives_memory_back_at_every_layer_only_near_the_budget(monkeypatch):
    import qlorakit.train.fast as fast_mod

    calls = []
    monkeypatch.setattr(fast_mod, "release_free_memory", lambda: calls.append(1) or True)
    model = _tiny()
    batch = _batch()
    layers = model.config.num_hidden_layers
    for ckpt, limit, expected in [(True, 1.0, 1 + 2 * layers), (True, 1e15, 0), (False, 1.0, 1)]:
        calls.clear()
        fm = FastModel(model, FastOptions(compile=False, checkpointing=ckpt, trim_above=limit), pad_token_id=PAD)
        s, n = fm(model, batch)
        (s / n).backward()
        # once per micro-batch, and with recomputation once per layer forward and per layer recomputed
        assert len(calls) == expected, (ckpt, limit, len(calls))


def test_per_use_weights_equal_cached_weights():
    model = _tiny()
    batch = _batch()
    a = _grads(model, FastModel(model, FastOptions(compile=False, weights="cache"), pad_token_id=PAD), batch)
    b = _grads(model, FastModel(model, FastOptions(compile=False, weights="per-use"), pad_token_id=PAD), batch)
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert FastModel(model, FastOptions(weights="per-use")).cached_weight_bytes() < \
        FastModel(model, FastOptions(weights="cache")).cached_weight_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_memory_estimate_counts_the_per_use_weight_buffers(dtype):
    """In per-use mode the fast path holds one reused buffer per stacked weight shape ([q|k|v],
    [gate|up]) for the run: the memory estimate counts exactly those bytes, and no weight copy."""
    from qlorakit.train.memory import ModelShape, estimate_memory, stacked_buffer_bytes

    model = _tiny()
    fm = FastModel(model, FastOptions(compile=False, weights="per-use", dtype=dtype), pad_token_id=PAD)
    _grads(model, fm, _batch(), autocast=False)
    held = sum(b.numel() * b.element_size() for b in fm._weight_buffers.values())
    assert len(fm._weight_buffers) == 2 and all(b.dtype == dtype for b in fm._weight_buffers.values())
    shape = ModelShape.from_config(model.config)
    size = torch.finfo(dtype).bits // 8
    assert stacked_buffer_bytes(shape, size) == held
    est = estimate_memory(shape, micro_batch=2, seq_len=48, r=8, weights="per-use", act_bytes=size)
    copy = "bf16" if size == 2 else "fp32"
    assert est.parts[f"{copy} buffers of the stacked weights (per use)"] == held
    assert f"{copy} copy of the base weights" not in est.parts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("out_features,in_features", [(192, 128), (130, 96), (64, 4096)])
def test_half_dequantization_equals_the_fp32_dequantization_rounded(out_features, in_features, double_quant, dtype):
    """Straight to bf16 (what both weight modes use) or fp16 gives bit for bit bitsandbytes' fp32
    values rounded, which is what the plain path multiplies with under autocast."""
    from torch import nn

    from qlorakit.quant.nf4 import dequantize, quantize_linear

    torch.manual_seed(out_features + in_features)
    lin = nn.Linear(in_features, out_features, bias=False)
    lin.weight.data[0, :7] *= 40.0  # a block with a large scale
    q = quantize_linear(lin, double_quant=double_quant)
    got, want = dequantize(q, dtype), dequantize(q).to(dtype)
    assert got.dtype == dtype and got.shape == (out_features, in_features)
    assert torch.equal(got, want)
    assert q.weight.quant_state.dtype == torch.float32  # the module's own state is left as it was
    assert dequantize(q).dtype == torch.float32


def test_per_use_weights_share_one_buffer_per_shape_and_keep_the_gradients():
    """Per-use stacked weights are written into one buffer per shape, reused layer after layer;
    with recomputation too (a weight read after the buffer moved on would change the gradients)."""
    model = _tiny()
    batch = _batch()
    ref = _grads(model, FastModel(model, FastOptions(compile=False, weights="cache"), pad_token_id=PAD), batch)
    fm = FastModel(model, FastOptions(compile=False, weights="per-use", checkpointing=True), pad_token_id=PAD)
    got = _grads(model, fm, batch)
    assert got[0] == ref[0] and all(torch.equal(x, y) for x, y in zip(got[2], ref[2]))
    first, second = fm.layers[0].gu.weight.get(), fm.layers[1].gu.weight.get()
    assert first.data_ptr() == second.data_ptr()  # the same memory, rewritten
    assert torch.equal(second, fm.layers[1].gu.weight.get())
    cached = FastModel(model, FastOptions(compile=False, weights="cache")).layers[0].gu.weight.get()
    assert torch.equal(fm.layers[0].gu.weight.get(), cached)


def test_fast_path_respects_disabled_adapters_and_eval_mode():
    model = _tiny(dropout=0.2)
    batch = _batch()
    fm = FastModel(model, FastOptions(compile=False), pad_token_id=PAD)
    model.eval()
    with torch.no_grad(), adapters_disabled(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sp, n = plain_loss(model, batch)
        sf, nf = fm(model, batch)
    assert n == nf and abs(float(sf) - float(sp)) / float(sp) <= 2e-3
    with torch.no_grad():
        s1, _ = fm(model, batch)
        s2, _ = fm(model, batch)
    assert float(s1) == float(s2) and abs(float(s1) - float(sf)) > 1e-3  # no dropout in eval; adapter on
    model.train()


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_head_loss_matches_cross_entropy(compiled):
    """Eager and compiled kernels (the native cross-entropy in both where it is built)."""
    from qlorakit.train import kernels as K

    if compiled and not K.compile_available():
        pytest.skip("no C++ compiler")
    torch.manual_seed(0)
    h = torch.randn(70, 32).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(500, 32) * 0.3).to(torch.bfloat16)
    t = torch.randint(0, 500, (70,))
    loss = fused_head_loss(h, w, t, chunk=16, compiled=compiled)
    loss.backward()
    h2 = h.detach().clone().requires_grad_(True)
    ref = F.cross_entropy((h2 @ w.t()).float(), t, reduction="sum")
    ref.backward()
    assert abs(float(loss) - float(ref)) <= 1e-4 * float(ref)
    assert _rel(h.grad.float(), h2.grad.float()) <= 1e-2


@pytest.mark.parametrize("n,chunk", [(64, 2048), (70, 2048), (2100, 2048), (130, 64)])
def test_head_matmuls_run_on_rounded_row_counts(n, chunk):
    """The loss-token count differs from batch to batch; oneDNN compiles and keeps a kernel for every
    matmul shape it meets, so the head's matmuls only ever see row counts rounded up to
    HEAD_ROW_STEP (zero rows added), and the loss and gradient are those of the n rows alone."""
    from torch.overrides import TorchFunctionMode

    from qlorakit.train.fast import HEAD_ROW_STEP

    rows: list[int] = []

    class _Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.mm:
                rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    h = torch.randn(n, 32).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(300, 32) * 0.3).to(torch.bfloat16)
    t = torch.randint(0, 300, (n,))
    with _Record():
        loss = fused_head_loss(h, w, t, chunk=chunk)
    loss.backward()
    assert rows and all(r % HEAD_ROW_STEP == 0 for r in rows), rows
    h2 = h.detach().clone().requires_grad_(True)
    ref = F.cross_entropy((h2 @ w.t()).float(), t, reduction="sum")
    ref.backward()
    assert abs(float(loss) - float(ref)) <= 1e-4 * float(ref)
    assert h.grad.shape == (n, 32)
    assert _rel(h.grad.float(), h2.grad.float()) <= 1e-2


def _native_or_skip():
    from qlorakit.train.native import attention_ops

    if attention_ops() is None:
        pytest.skip("native attention kernels not built here (no C++ compiler or ninja, or QLORAKIT_NATIVE=0)")


def _amx_or_skip():
    from qlorakit.train.native import amx_attention_ops

    _native_or_skip()
    if amx_attention_ops() is None:
        pytest.skip("no AMX on this CPU (ATen cannot pack bf16 operands for oneDNN's AMX micro-kernel)")


@pytest.mark.parametrize("impl,lengths,d", [
    ("python", (7, 12, 5), 16),
    ("native", (7, 12, 5), 16),
    ("fused", (7, 12, 5), 16),
    ("python", (7, 300, 40), 16),  # a long segment, padded to 320 tokens in the backward
    ("native", (7, 300, 40), 16),
    ("amx", (7, 12, 5), 32),
    ("amx", (7, 300, 1, 32, 40), 64),  # a single token; lengths at and off the 32-token block
    ("amx", (70, 33), 128),
])
def test_segment_attention_matches_masked_sdpa(impl, lengths, d):
    """Every implementation: the CPU one with its Python loop, with the native loop, and on AMX
    tiles, and the per-segment fused one other devices take (run here on the CPU, the same code as
    on a GPU)."""
    if impl == "native":
        _native_or_skip()
    if impl == "amx":
        _amx_or_skip()
    torch.manual_seed(0)
    n_kv, groups = 2, 3
    pos = torch.cat([torch.arange(x) for x in lengths])
    segs = segments_from_positions(pos)
    assert [e - s for s, e in segs] == list(lengths)
    n = pos.numel()
    q = torch.randn(n_kv, n, groups, d).to(torch.bfloat16).requires_grad_(True)
    k = torch.randn(n_kv, n, d).to(torch.bfloat16).requires_grad_(True)
    v = torch.randn(n_kv, n, d).to(torch.bfloat16).requires_grad_(True)
    if impl == "fused":
        out = _fused_segments(q, k, v, segs, d ** -0.5)
    else:
        out = segment_attention(q, k, v, segs, d ** -0.5, impl=impl)
    go = torch.randn_like(out)
    out.backward(go)
    # reference: fp32 SDPA over the whole stream with a block-diagonal causal mask
    seg_id = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(segs)])
    mask = (seg_id[:, None] == seg_id[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    qr, kr, vr = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    q4 = qr.permute(0, 2, 1, 3).reshape(1, n_kv * groups, n, d)  # head j*G+g
    k4 = kr[None].repeat_interleave(groups, dim=1)
    v4 = vr[None].repeat_interleave(groups, dim=1)
    ref = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)[0].permute(1, 0, 2).reshape(n, -1)
    ref.backward(go.float())
    assert _rel(out.float(), ref) <= 1e-2
    for a, b in ((q, qr), (k, kr), (v, vr)):
        assert _rel(a.grad.float(), b.grad) <= 2e-2


@pytest.mark.parametrize("impl", ["python", "native", "amx"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_attention_gradients_hold_their_precision_with_biased_queries_and_keys(seed, impl):
    """Queries and keys sharing a large common part (k_proj / q_proj biases, as Qwen2 has): the
    CPU backward's gradients (Python loop, native loop, AMX kernels) against a float64 reference
    are as precise as bf16 SDPA's with autograd; dq more precise (its matmul uses the keys less
    their segment mean)."""
    if impl == "native":
        _native_or_skip()
    if impl == "amx":
        _amx_or_skip()
    torch.manual_seed(seed)
    n_kv, groups, d = 1, 4, 32 if impl == "amx" else 16
    pos = torch.cat([torch.arange(x) for x in (20, 18, 10)])
    segs = segments_from_positions(pos)
    n = pos.numel()
    q0 = (torch.randn(n_kv, n, groups, d) + 3 * torch.randn(d)).to(torch.bfloat16)
    k0 = (torch.randn(n_kv, n, d) + 3 * torch.randn(d)).to(torch.bfloat16)
    v0 = torch.randn(n_kv, n, d).to(torch.bfloat16)
    go = torch.randn(n, n_kv * groups * d).to(torch.bfloat16)

    def sdpa(q, k, v):
        outs = []
        for s, e in segs:
            length = e - s
            q4 = q[:, s:e].permute(0, 2, 1, 3).reshape(1, n_kv * groups, length, d)
            k4 = k[None, :, s:e].repeat_interleave(groups, dim=1)
            v4 = v[None, :, s:e].repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=d ** -0.5)
            outs.append(o[0].view(n_kv, groups, length, d).permute(2, 0, 1, 3).reshape(length, -1))
        return torch.cat(outs)

    def grads(fn, dtype):
        xs = [x.detach().to(dtype).clone().requires_grad_(True) for x in (q0, k0, v0)]
        fn(*xs).backward(go.to(dtype))
        return [x.grad.double() for x in xs]

    ref = grads(sdpa, torch.float64)
    bf16 = grads(sdpa, torch.bfloat16)
    ours = grads(lambda q, k, v: segment_attention(q, k, v, segs, d ** -0.5, impl=impl), torch.bfloat16)
    err = [_rel(a, r) for a, r in zip(ours, ref)]
    err_sdpa = [_rel(a, r) for a, r in zip(bf16, ref)]
    assert err[0] <= 0.75 * err_sdpa[0], (err, err_sdpa)
    assert err[1] <= 1.5 * err_sdpa[1] and err[2] <= 1.5 * err_sdpa[2], (err, err_sdpa)


@pytest.mark.parametrize("n_kv,groups,d,lengths", [
    (3, 3, 64, (334, 297, 1, 32, 64, 121)),  # the packaged model's heads; lengths at and off the 32-token step
    (2, 1, 16, (5, 40, 7)),  # no grouping
    (1, 4, 8, (90,)),  # one segment
])
def test_native_attention_backward_gives_the_python_loops_gradients(n_kv, groups, d, lengths):
    """The native loop builds the same operands and runs the same products as the Python loop; only
    its exp differs from torch.exp (a polynomial within 2 ulp in fp32, then rounded to bf16), so
    the gradients agree to within a rare last-bit difference."""
    _native_or_skip()
    torch.manual_seed(0)
    pos = torch.cat([torch.arange(x) for x in lengths])
    segs = segments_from_positions(pos)
    n = pos.numel()
    q0 = (torch.randn(n_kv, n, groups, d) + torch.randn(d)).to(torch.bfloat16)
    k0 = (torch.randn(n_kv, n, d) + 2 * torch.randn(d)).to(torch.bfloat16)
    v0 = torch.randn(n_kv, n, d).to(torch.bfloat16)
    go = torch.randn(n, n_kv * groups * d).to(torch.bfloat16)

    def grads(impl):
        xs = [x.clone().requires_grad_(True) for x in (q0, k0, v0)]
        out = segment_attention(*xs, segs, d ** -0.5, impl=impl)
        out.backward(go)
        return out.detach(), [x.grad for x in xs]

    out_py, g_py = grads("python")
    out_nat, g_nat = grads("native")
    assert torch.equal(out_nat, out_py)  # the forward is the same code
    for a, b in zip(g_nat, g_py):
        assert a.shape == b.shape and torch.isfinite(a).all()
        assert (a != b).float().mean() <= 1e-3 and _rel(a.float(), b.float()) <= 1e-3


def test_amx_attention_is_at_least_as_precise_as_the_native_loop():
    """The AMX kernels keep scores, the softmax and dp - delta in fp32 where the native loop rounds
    shifted scores to bf16: against a float64 reference, on the packaged model's heads with lengths
    at and off the 32-token block, their output and gradients are no less precise."""
    _amx_or_skip()
    torch.manual_seed(0)
    n_kv, groups, d, lengths = 3, 3, 64, (334, 297, 1, 32, 64, 121)
    pos = torch.cat([torch.arange(x) for x in lengths])
    segs = segments_from_positions(pos)
    n = pos.numel()
    q0 = (torch.randn(n_kv, n, groups, d) + torch.randn(d)).to(torch.bfloat16)
    k0 = (torch.randn(n_kv, n, d) * 2 + 2 * torch.randn(d)).to(torch.bfloat16)
    v0 = torch.randn(n_kv, n, d).to(torch.bfloat16)
    go = torch.randn(n, n_kv * groups * d).to(torch.bfloat16)

    def run(impl, dtype):
        xs = [x.to(dtype).clone().requires_grad_(True) for x in (q0, k0, v0)]
        if impl == "fused":
            out = _fused_segments(*xs, segs, d ** -0.5)
        else:
            out = segment_attention(*xs, segs, d ** -0.5, impl=impl)
        out.backward(go.to(dtype))
        return [out.detach().double()] + [x.grad.double() for x in xs]

    ref = run("fused", torch.float64)
    err = {impl: [_rel(a, r) for a, r in zip(run(impl, torch.bfloat16), ref)] for impl in ("native", "amx")}
    for e_amx, e_nat in zip(err["amx"], err["native"]):
        assert e_amx <= 1.05 * e_nat, err
        assert e_amx <= 5e-3, err


def test_amx_attention_refuses_segments_outside_the_tokens_and_unknown_impls():
    _amx_or_skip()
    from qlorakit.train.native import amx_attention_ops

    ops = amx_attention_ops()
    q = torch.zeros(1, 40, 2, 32, dtype=torch.bfloat16)
    k = torch.zeros(1, 40, 32, dtype=torch.bfloat16)
    o = torch.empty(40, 64, dtype=torch.bfloat16)
    lse = torch.empty(1, 40, 2)
    scratch = torch.empty(ops.scratch_numel(1, 2, 32, 64), dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"segment 1 \[30, 50\) is not inside the 40 tokens"):
        ops.forward(q, k, k, [0, 30], [30, 50], 0.1, o, lse, scratch)
    with pytest.raises(ValueError, match="impl 'fast' is not one of"):
        segment_attention(q, k, k, [(0, 40)], 0.1, impl="fast")
    with pytest.raises(ValueError, match="multiple of 32"):
        segment_attention(q[..., :16].contiguous(), k[..., :16].contiguous(), k[..., :16].contiguous(), [(0, 40)],
                          0.1, impl="amx")


def test_native_elementwise_steps_equal_the_python_kernels():
    """Probabilities from shifted scores (the causal mask, rows past the segment zero) and the softmax
    backward, against the Python kernels they replace."""
    _native_or_skip()
    from qlorakit.train import kernels as K
    from qlorakit.train.native import attention_ops

    ops = attention_ops()
    torch.manual_seed(0)
    groups, rows, keys, valid = 3, 96, 32, 29  # 32 query tokens of which 29 real
    x = (torch.randn(2, rows, keys) * 4 - 3).to(torch.bfloat16)
    got = ops.probs(x, 0.125, groups, valid)
    want = K.attn_probs_shifted(x, 0.125, groups, valid)
    assert (got != want).float().mean() <= 1e-3 and _rel(got.float(), want.float()) <= 1e-3
    assert got[:, valid * groups:].abs().sum() == 0 and got[0, 0, 1:].abs().sum() == 0  # padding rows, the mask
    assert float(got[0, 0, 0]) == pytest.approx(float(torch.exp(x[0, 0, 0].float() * 0.125)), rel=4e-3)
    dp = torch.randn(2, rows, keys).to(torch.bfloat16)
    # equal values (+ 0 turns the Python kernel's -0 products into +0)
    assert torch.equal(ops.dscores(want, dp, 0.125, groups, valid).float() + 0, K.attn_dscores(want, dp, 0.125).float() + 0)


def test_native_cross_entropy_matches_the_python_kernel():
    """The summed loss against fp32 cross-entropy, the gradient written over the logits against the
    Python kernel (one bf16 rounding apart), and a target outside the vocabulary named."""
    _native_or_skip()
    from qlorakit.train import kernels as K
    from qlorakit.train.native import cross_entropy_ops

    torch.manual_seed(0)
    logits = (torch.randn(37, 1000) * 3).to(torch.bfloat16)
    logits[3, 7] = 40.0  # a confident row
    target = torch.randint(0, 1000, (37,))
    target[3] = 7
    mine, ref = logits.clone(), logits.clone()
    loss = cross_entropy_ops().ce_fwd_bwd_(mine, target)
    want = F.cross_entropy(logits.float(), target, reduction="sum")
    assert loss.dtype == torch.float32 and abs(float(loss) - float(want)) <= 1e-5 * float(want)
    K._ce_fwd_bwd_inplace_eager(ref, target)
    assert (mine != ref).float().mean() <= 1e-3 and _rel(mine.float(), ref.float()) <= 1e-3
    assert float(mine.float().sum(1).abs().max()) <= 0.05  # each row of the gradient sums to 0
    bad = target.clone()
    bad[5] = 1000
    with pytest.raises(RuntimeError, match="target 1000 of row 5 is outside the vocabulary of 1000"):
        cross_entropy_ops().ce_fwd_bwd_(logits.clone(), bad)


def test_native_kernels_fall_back_to_the_python_loop(monkeypatch, caplog):
    """QLORAKIT_NATIVE=0, and a build that fails (logged with its error), both leave the Python loop."""
    import torch.utils.cpp_extension as ext

    from qlorakit.train import native

    native._library.cache_clear()
    try:
        monkeypatch.setenv("QLORAKIT_NATIVE", "0")
        assert native.attention_ops() is None and native.amx_attention_ops() is None
        native._library.cache_clear()
        monkeypatch.setenv("QLORAKIT_NATIVE", "1")
        monkeypatch.setattr("qlorakit.train.kernels.compile_available", lambda: True)
        monkeypatch.setattr(ext, "is_ninja_available", lambda: True)

        def broken(**kwargs):
            raise RuntimeError("Error building extension 'x': c++: fatal error")

        monkeypatch.setattr(ext, "load", broken)
        with caplog.at_level("WARNING", logger="qlorakit.train.native"):
            assert native.attention_ops() is None and native.amx_attention_ops() is None
        assert "could not build the native kernels" in caplog.text and "fatal error" in caplog.text
    finally:
        native._library.cache_clear()


def test_unsupported_models_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "gpt2" in fast_supported(model)
    with pytest.raises(FastUnsupported, match="gpt2"):
        FastModel(model)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("used", ["both", "norm only", "sum only"])
def test_fused_residual_add_and_norm_match_autograd_of_the_separate_ops(compiled, used):
    """``x + y`` and the RMSNorm after it in one kernel each way (:class:`_AddNorm`): the same values
    and gradients as autograd through the add (fp32 + bf16) and the norm, whichever outputs the loss
    uses; y's gradient comes back in y's dtype."""
    from qlorakit.train import kernels as K
    from qlorakit.train.fast import _AddNorm

    if compiled and not K.compile_available():
        pytest.skip("no C++ compiler for inductor")
    torch.manual_seed(0)
    x = torch.randn(70, 48, requires_grad=True)
    y = torch.randn(70, 48).bfloat16().requires_grad_()
    w = torch.rand(48) + 0.5
    gs, gh = torch.randn(70, 48), torch.randn(70, 48).bfloat16()

    def loss(s, h):
        parts = []
        if used in ("both", "sum only"):
            parts.append((s * gs).sum())
        if used in ("both", "norm only"):
            parts.append((h.float() * gh.float()).sum())
        return sum(parts)

    s, h = _AddNorm.apply(x, y, w, 1e-5, compiled, torch.bfloat16)
    got = torch.autograd.grad(loss(s, h), (x, y))
    s_ref = x + y
    h_ref = (w * (s_ref * torch.rsqrt(s_ref.pow(2).mean(-1, keepdim=True) + 1e-5))).bfloat16()
    want = torch.autograd.grad(loss(s_ref, h_ref), (x, y))
    assert torch.equal(s, s_ref) and torch.equal(h, h_ref)
    assert got[1].dtype == torch.bfloat16
    assert _rel(got[0], want[0]) < 1e-5
    assert _rel(got[1].float(), want[1].float()) < 1e-2  # one bf16 rounding of the same fp32 sum


@pytest.mark.slow
def test_compiled_kernels_equal_eager_kernels():
    from qlorakit.train import kernels as K

    if not K.compile_available():
        pytest.skip("no C++ compiler for inductor")
    model = _tiny(dropout=0.1)  # the dropout kernel too: the same keys give the same masks
    batch = _batch()
    eager = _grads(model, FastModel(model, FastOptions(compile=False), pad_token_id=PAD), batch)
    comp = _grads(model, FastModel(model, FastOptions(compile=True), pad_token_id=PAD), batch)
    _assert_close(comp, eager)


def _loaded(device: str, dtype=torch.bfloat16):
    from types import SimpleNamespace

    return SimpleNamespace(device=torch.device(device), compute_dtype=dtype,
                           tokenizer=SimpleNamespace(pad_token_id=PAD))


def test_cuda_options_hold_the_bf16_copy_only_when_it_fits_half_the_free_memory():
    from qlorakit.train.fast import cuda_fast_options

    model = _tiny()
    copy = 2 * sum(m.out_features * m.in_features for m in model.modules() if is_linear4bit(m))
    assert cuda_fast_options(model, checkpointing=False, free_bytes=2 * copy).weights == "cache"
    small = cuda_fast_options(model, checkpointing=True, free_bytes=2 * copy - 2)
    assert small.weights == "per-use" and small.checkpointing and not small.compile


def test_prepare_fast_falls_back_off_bf16_and_fp32_and_off_cpu_and_cuda():
    from qlorakit.train.fast import fast_path_runs, prepare_fast
    from qlorakit.train.loss import chunked_loss

    model = _tiny()
    assert prepare_fast(model, None, _loaded("cpu", torch.float16)) is chunked_loss
    assert prepare_fast(model, None, _loaded("cuda", torch.float32)) is chunked_loss
    assert prepare_fast(model, None, _loaded("meta")) is chunked_loss
    fm = prepare_fast(model, None, _loaded("cpu"), options=FastOptions(compile=False))
    assert isinstance(fm, FastModel) and fm.pad_token_id == PAD
    # fp32 on the CPU (no bf16 instructions) runs the fast path too
    assert fast_path_runs(model, _loaded("cpu", torch.float32))
    fm32 = prepare_fast(model, None, _loaded("cpu", torch.float32), options=FastOptions(compile=False, dtype=torch.float32))
    assert isinstance(fm32, FastModel) and fm32.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prepare_fast_takes_the_fast_path_on_cuda():
    """What `qlorakit train` runs on a GPU: the fast path, with the bf16 copy where it fits; its
    loss and gradients are the plain path's there."""
    from qlorakit.train.fast import prepare_fast

    model = _tiny(device="cuda")
    fm = prepare_fast(model, None, _loaded("cuda"))
    assert isinstance(fm, FastModel) and fm.options.weights == "cache" and not fm.options.compile
    batch = {k: v.cuda() for k, v in _batch(pad_tail=True).items()}
    _assert_close(_grads(model, fm, batch), _grads(model, plain_loss, batch))
