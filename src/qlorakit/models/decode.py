"""A lean decoder for generation with Llama-style models: the same arithmetic as transformers'
``generate`` on the same modules, with the per-token overhead taken out.

On a CPU, decoding one token of a small model is mostly Python and dispatch: a transformers + peft
forward calls some 2,000 operators per token (mask building, cache bookkeeping, a LoRA wrapper
per linear), and the matrix-vector products are a minority of the time. :class:`Decoder` reads the
model's own weights in place and runs each layer as a short fixed sequence of operators:

- The frozen 4-bit linears that read the same input (q/k/v, gate/up) are one product.
- Where bitsandbytes computes inference with its packed AVX512-BF16 kernel (it repacks a 4-bit
  weight at the first no-grad forward on such CPUs), the decoder calls that same kernel on its own
  packed copy of the weights (4 bits per weight; the module's weight, and so training, is left
  untouched), so the numbers are bitsandbytes' inference numbers. Products of more than
  ``PACKED_MAX_ROWS`` rows (long prompts) use the module's bf16 weight cache instead, where that is
  several times faster. Elsewhere the module's own forward runs.
- The LoRA factors of one group are one ``A`` product for a single token; each member's update is
  ``B(A(x)) * scaling`` added to the base output, the order peft uses.
- The key/value cache is preallocated; attention is ``scaled_dot_product_attention`` with the
  arguments transformers passes it (grouped-query heads, causal for the prompt).

Greedy decoding takes the first maximal logit, sampling applies temperature and then top-p as
transformers' warpers do, and a minimum length masks the stop tokens until it is reached, so with the
same seed the decoder and ``generate`` pick the same tokens. A test compares logits and tokens with
``generate`` on the same modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Decoder", "decoder_for", "PACKED_MAX_ROWS"]

BF16 = torch.bfloat16
PACKED_MAX_ROWS = 64  # the packed kernel's time grows with every row; beyond this a bf16 matmul is faster


def _bnb_packs_on_cpu() -> bool:
    """Whether bitsandbytes' inference path on this CPU is its packed AVX512-BF16 kernel."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def _packed(bases: Sequence[nn.Module]) -> tuple[torch.Tensor, Any] | None:
    """One packed copy of the 4-bit weights of ``bases`` stacked along the output dimension, in the
    layout and with the quantization state bitsandbytes' packed kernel reads; None when not possible."""
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from ..quant import is_linear4bit

    if not all(is_linear4bit(b) and b.weight.device.type == "cpu" for b in bases):
        return None
    states = [b.weight.quant_state for b in bases]
    if any(getattr(s, "packing_format_for_cpu", False) or s.shape[1] % s.blocksize or s.shape[0] % 32 for s in states):
        return None
    if len({(s.quant_type, s.blocksize, s.shape[1]) for s in states}) != 1:
        return None
    packed, absmax = [], []
    for b, s in zip(bases, states):
        st = copy.copy(s)  # the conversion rewrites its state in place: work on a copy
        if s.nested:
            st.state2 = copy.copy(s.state2)
        w, st = _convert_weight_packed_for_cpu(b.weight.data.clone(), st)
        packed.append(w)
        absmax.append(st.absmax)
    st.absmax = torch.cat(absmax, dim=1).contiguous()  # (in / blocksize, out) bf16
    st.shape = torch.Size([sum(s.shape[0] for s in states), states[0].shape[1]])
    return torch.cat(packed, dim=0).contiguous(), st


def _packed_kernel(quant_type: str) -> Any:
    """bitsandbytes' packed CPU kernel as a C function, when the registered op would call it; else None
    (the registered op is then called, whichever kernel it picks)."""
    try:
        import bitsandbytes.backends.cpu.ops as cpu_ops
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    if getattr(cpu_ops, "gemm_4bit_forward_kernel", None) is not None:
        return None
    return getattr(lib, f"gemv_4bit_inference_cpu_{quant_type}_bf16", None)


class _Group:
    """Linears that read the same input: base products (one packed product where possible) plus
    each member's LoRA update, returned as one (rows, sum of outputs) fp32 tensor."""

    def __init__(self, mods: Sequence[nn.Module], pack: bool):
        from ..lora import LoraLinear

        self.loras = [m if isinstance(m, LoraLinear) else None for m in mods]
        self.bases = [m.base if isinstance(m, LoraLinear) else m for m in mods]
        self.sizes = [b.out_features for b in self.bases]
        self.n_out = sum(self.sizes)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.packed = _packed(self.bases) if pack else None
        self.kernel = None
        self.bias = None
        if self.packed is not None:
            w, st = self.packed
            self.kernel = _packed_kernel(st.quant_type)
            if self.kernel is not None:
                import ctypes as ct

                self._w_ptr, self._absmax_ptr = ct.c_void_p(w.data_ptr()), ct.c_void_p(st.absmax.data_ptr())
                self._blocksize = ct.c_int64(st.blocksize)
                k = self.bases[0].in_features
                self._xb = torch.empty(1, k, dtype=BF16)
                self._out1 = torch.empty(1, self.n_out, dtype=BF16)
                self._args1 = self._kernel_args(1, self._xb, self._out1)
            self.dtype = self.bases[0].compute_dtype or BF16
            bias = [getattr(b, "bias", None) for b in self.bases]
            if any(x is not None for x in bias):
                self.bias = torch.cat([x.detach() if x is not None else torch.zeros(n)
                                       for x, n in zip(bias, self.sizes)]).to(self.dtype)
        self.lora: list[tuple[torch.Tensor, torch.Tensor, float, int]] = []  # (A^T, B^T, scaling, r) of adapted members
        self.spans: list[tuple[int, int]] = []
        self.a_cat: torch.Tensor | None = None
        self.pow2 = True

    def refresh(self) -> None:
        """Read the LoRA factors as they are now (an adapter may have been switched or disabled)."""
        on = [lo is not None and bool(lo.enabled) for lo in self.loras]
        self.lora = [(lo.lora_A.weight.t(), lo.lora_B.weight.t(), lo.scaling, lo.r) for lo, a in zip(self.loras, on) if a]
        self.spans = [(o, o + n) for o, n, a in zip(self.offsets, self.sizes, on) if a]
        # (in, sum r): the transposed view of the stacked A factors, as F.linear multiplies with it
        self.a_cat = torch.cat([at.t() for at, _, _, _ in self.lora], dim=0).t() if len(self.lora) > 1 else None
        self.pow2 = all(sc > 0 and math.frexp(sc)[0] == 0.5 for _, _, sc, _ in self.lora)

    def _kernel_args(self, rows: int, xb: torch.Tensor, out: torch.Tensor) -> tuple[Any, ...]:
        import ctypes as ct

        k = xb.shape[1]
        return (ct.c_int64(rows), ct.c_int64(self.n_out), ct.c_int64(k), ct.c_void_p(xb.data_ptr()), self._w_ptr,
                self._absmax_ptr, ct.c_void_p(out.data_ptr()), self._blocksize, ct.c_int64(k), ct.c_int64(self.n_out))

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) fp32, as ``Linear4bit.forward`` computes it: input in the compute
        dtype (the kernel takes bf16), output back in the input's dtype."""
        rows = x.shape[0]
        if self.packed is None or rows > PACKED_MAX_ROWS:
            ys = [b(x) for b in self.bases]
            return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        if self.kernel is None:
            import bitsandbytes as bnb

            w, st = self.packed
            out = bnb.matmul_4bit(x.to(BF16), w, quant_state=st)
        elif rows == 1:  # a decode step: fixed buffers and arguments (the result below is a fresh tensor)
            self._xb.copy_(x)
            self.kernel(*self._args1)
            out = self._out1
        else:  # the C kernel bitsandbytes' op calls, without the op's Python checks
            xb = x.to(BF16).contiguous()
            out = torch.empty(rows, self.n_out, dtype=BF16)
            self.kernel(*self._kernel_args(rows, xb, out))
        if self.dtype != BF16:
            out = out.to(self.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.lora:
            return y
        if self.a_cat is not None and x.shape[0] == 1:
            # one token: the A products of the group in one product (the same dot products)
            h = torch.mm(x, self.a_cat)  # = F.linear(x, A_cat): the same mm on the transposed view
            hs, r0 = [], 0
            for _, _, _, r in self.lora:
                hs.append(h[:, r0:r0 + r])
                r0 += r
        else:
            hs = [torch.mm(x, at) for at, _, _, _ in self.lora]
        if self.pow2:
            # peft: result + lora_B(lora_A(x)) * scaling. With a power-of-two scaling the product is
            # scaled exactly, so addmm's single rounding of y + scaling * (h B^T) is the same number
            for (a, b), hh, (_, bt, sc, _) in zip(self.spans, hs, self.lora):
                y[:, a:b].addmm_(hh, bt, alpha=sc)
            return y
        for (a, b), hh, (_, bt, sc, _) in zip(self.spans, hs, self.lora):
            y[:, a:b] += F.linear(hh, bt.t()) * sc
        return y


class _GreedyHead:
    """The first maximal logit of ``h W^T`` (``W`` the fp32 output head) without the full fp32 product.

    An int8 copy of the head (per-row scales) gives every logit to within a bound that is exact
    arithmetic, not an estimate: the weight error of each row (measured when the copy is made),
    the bf16 rounding of ``h`` and of the int8 product's output, and fp32 summation error. Only the
    rows whose interval reaches the best lower bound are computed in fp32. The winner is accepted
    only when it beats every other candidate by more than twice the summation error any fp32 dot
    product of that length can make, so it is the token the full fp32 product picks, whatever its
    summation order; otherwise (near-ties) :meth:`pick` returns None and the caller computes the full
    product."""

    MAX_CANDIDATES = 2048
    ROWS = 4096  # rows of the head per block while the int8 copy is made

    def __init__(self, w: torch.Tensor):
        n, k = w.shape
        s = w.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s)).to(BF16)
        q = torch.empty(n, k, dtype=torch.int8, device=w.device)
        err = torch.empty(n, dtype=torch.float64, device=w.device)
        m = torch.empty(n, dtype=torch.float64, device=w.device)
        # row by row in blocks: the float64 temporaries of the whole head would take 4 x 8 bytes per
        # weight at once (900 MB for a 49k x 576 head, against its 113 MB)
        for i in range(0, n, self.ROWS):
            wc, sc = w[i:i + self.ROWS], s[i:i + self.ROWS]
            qc = q[i:i + self.ROWS]
            qc.copy_(torch.round(wc / sc.float()[:, None]).clamp_(-127, 127))
            wq = qc.double() * sc.double()[:, None]
            err[i:i + self.ROWS] = (wc.double() - wq).abs().amax(dim=1)
            m[i:i + self.ROWS] = torch.maximum(wc.abs().amax(dim=1).double(), wq.abs().amax(dim=1))
        self.gamma = 2 * (k + 1) * 2.0 ** -24  # fp32 dot products of length k: |error| <= gamma/2 * sum|x w|
        # per unit of ||h||_1: weight error + bf16 rounding of h (2^-8 |h| |w|, generous) + summation
        self.radius = ((err + m * (2.0 ** -8 + self.gamma)) * (1 + 2.0 ** -10)).float()
        self.row_max = m.float()
        self.w, self.q, self.scales = w, q, s

    @staticmethod
    def available() -> bool:
        try:
            torch._weight_int8pack_mm(torch.zeros(1, 64, dtype=BF16), torch.zeros(8, 64, dtype=torch.int8),
                                      torch.ones(8, dtype=BF16))
        except (RuntimeError, AttributeError, NotImplementedError):
            return False
        return True

    def pick(self, h: torch.Tensor, banned: torch.Tensor | None) -> int | None:
        """The greedy token for the final hidden state ``h`` (1, H) fp32, or None when undecided."""
        l1 = float(h.abs().sum())
        if not math.isfinite(l1):
            return None
        approx = torch._weight_int8pack_mm(h.to(BF16), self.q, self.scales)[0].float()
        bound = self.radius * l1 + approx.abs() * 2.0 ** -8  # + the bf16 rounding of the output
        if banned is not None:
            approx[banned] = -float("inf")
        cand = ((approx + bound) >= (approx - bound).max()).nonzero()[:, 0]
        if cand.numel() > self.MAX_CANDIDATES:
            return None
        exact = F.linear(h, self.w.index_select(0, cand))[0]
        best = int(torch.argmax(exact))
        if cand.numel() > 1:
            tol = self.row_max.index_select(0, cand) * (self.gamma * l1)  # 2 x (gamma/2 sum|h w|)
            rest = exact + tol
            rest[best] = -float("inf")
            if not bool(exact[best] - tol[best] > rest.max()):
                return None
        return int(cand[best])


@dataclass
class _Layer:
    in_w: torch.Tensor
    in_eps: float
    post_w: torch.Tensor
    post_eps: float
    qkv: _Group
    o: _Group
    gu: _Group
    down: _Group


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # LlamaRMSNorm on an fp32 stream
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def why_not(model: nn.Module) -> str | None:
    """None when :class:`Decoder` can run ``model``; otherwise the reason it cannot."""
    from ..lora import LoraLinear
    from ..quant import is_linear4bit
    from ..train.fast import fast_supported

    why = fast_supported(model)
    if why:
        return why
    if next(model.parameters()).dtype != torch.float32:
        return "the model is not held in fp32"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", None):
        return f"attention implementation {model.config._attn_implementation!r}"
    for layer in model.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if isinstance(mod, LoraLinear):  # inference: LoRA dropout is off, as in eval mode
                mod = mod.base
            if not isinstance(mod, nn.Linear) and not is_linear4bit(mod):
                return f"a projection of type {type(mod).__name__}"
    gc = getattr(model, "generation_config", None)
    for key, neutral in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0), ("encoder_repetition_penalty", 1.0)):
        v = getattr(gc, key, None)
        if v not in (None, neutral):
            return f"generation_config.{key}={v!r}"
    if getattr(gc, "bad_words_ids", None) or getattr(gc, "suppress_tokens", None) or getattr(gc, "begin_suppress_tokens", None):
        return "token suppression in generation_config"
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "an output head that is not a plain linear"
    return None


class Decoder:
    """The decoding loop of one Llama-style model (see the module text). Inference only (LoRA
    dropout off); one generation at a time per model, as the server's single worker runs them."""

    def __init__(self, model: nn.Module):
        why = why_not(model)
        if why:
            raise ValueError(f"the fast decoder cannot run this model: {why}")
        cfg = model.config
        inner = model.model
        pack = _bnb_packs_on_cpu()
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm_w, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = model.get_output_embeddings().weight
        self.n_q = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = inner.layers[0].self_attn.scaling
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.layers = []
        for L in inner.layers:
            a, m = L.self_attn, L.mlp
            self.layers.append(_Layer(L.input_layernorm.weight, L.input_layernorm.variance_epsilon,
                                      L.post_attention_layernorm.weight, L.post_attention_layernorm.variance_epsilon,
                                      _Group([a.q_proj, a.k_proj, a.v_proj], pack), _Group([a.o_proj], pack),
                                      _Group([m.gate_proj, m.up_proj], pack), _Group([m.down_proj], pack)))
        self.groups = [g for L in self.layers for g in (L.qkv, L.o, L.gu, L.down)]
        self.projections = _projections(model)
        self.packs = any(g.packed is not None for g in self.groups)
        self.greedy_head = (_GreedyHead(self.head.detach()) if self.head.dtype == torch.float32 and _GreedyHead.available()
                            else None)

    def _forward(self, ids: torch.Tensor, pos: int, cache: list[tuple[torch.Tensor, torch.Tensor]],
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden state (1, H) fp32 of the last of ``ids`` (T,), whose first position is ``pos``."""
        T = ids.shape[0]
        x = self.embed(ids)  # (T, H) fp32 residual stream
        c, s = cos[:, pos:pos + T], sin[:, pos:pos + T]  # (1, T, D): broadcast over heads
        end = pos + T
        nq, nkv, d = self.n_q, self.n_kv, self.d
        for L, (kc, vc) in zip(self.layers, cache):
            qkv = L.qkv(_rms(x, L.in_w, L.in_eps))
            qk = qkv[:, :(nq + nkv) * d].view(T, nq + nkv, d).transpose(0, 1)
            qk = qk * c + _rotate_half(qk) * s  # q and k rotated together (elementwise, per head)
            kc[:, pos:end] = qk[nq:]
            vc[:, pos:end] = qkv[:, (nq + nkv) * d:].view(T, nkv, d).transpose(0, 1)
            a = F.scaled_dot_product_attention(qk[None, :nq], kc[None, :, :end], vc[None, :, :end], scale=self.scale,
                                               is_causal=T > 1, enable_gqa=nq != nkv)
            x = x + L.o(a[0].transpose(0, 1).reshape(T, nq * d))
            gu = L.gu(_rms(x, L.post_w, L.post_eps))
            n_i = gu.shape[1] // 2
            x = x + L.down(F.silu(gu[:, :n_i]) * gu[:, n_i:])
        return _rms(x[-1:], self.norm_w, self.norm_eps)  # (1, H)

    @torch.inference_mode()
    def tokens(self, input_ids: Sequence[int], max_new_tokens: int, *, stop_ids: Sequence[int] = (),
               temperature: float = 0.0, top_p: float = 1.0, min_new_tokens: int = 0,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield new token ids one by one (a stop id is yielded, then the loop ends)."""
        n = len(input_ids)
        if n == 0:
            raise ValueError("the prompt has no tokens")
        if max_new_tokens <= 0:
            return
        total = n + max_new_tokens
        if self.max_positions and total > self.max_positions:
            total = max(self.max_positions, n + 1)
        for grp in self.groups:
            grp.refresh()
        dt = self.head.dtype
        cache = [(torch.empty(self.n_kv, total, self.d, dtype=dt), torch.empty(self.n_kv, total, self.d, dtype=dt))
                 for _ in self.layers]
        probe = torch.empty(1, 1, self.head.shape[1], dtype=dt)
        cos, sin = self.rotary(probe, torch.arange(total).unsqueeze(0))  # (1, total, D)

        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        ids = torch.tensor(list(input_ids), dtype=torch.long)
        pos = 0
        greedy = not temperature or temperature <= 0
        for step in range(min(max_new_tokens, total - n)):
            h = self._forward(ids, pos, cache, cos, sin)
            pos += ids.shape[0]
            banned = stops if step < min_new_tokens and stops.numel() else None
            nxt = self.greedy_head.pick(h, banned) if greedy and self.greedy_head is not None else None
            if nxt is None:
                logits = F.linear(h, self.head)[0]
                if banned is not None:
                    logits[banned] = -float("inf")
                nxt = _pick(logits, temperature, top_p, generator)
            yield nxt
            if nxt in stop_ids:
                return
            ids = torch.tensor([nxt], dtype=torch.long)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (first maximal logit) or temperature + top-p sampling, as transformers' warpers do it."""
    if not temperature or temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits / temperature
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[-1:] = False
        scores = scores.masked_fill(remove.scatter(0, sorted_idx, remove), -float("inf"))
    probs = F.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def _projections(model: nn.Module) -> list[nn.Module]:
    return [getattr(blk, name) for L in model.model.layers
            for blk, names in ((L.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                               (L.mlp, ("gate_proj", "up_proj", "down_proj")))
            for name in names]


def decoder_for(model: nn.Module) -> Decoder | None:
    """The model's decoder, built once and kept on the model (rebuilt when a projection module has
    been replaced since, e.g. by attaching LoRA layers); None when it cannot run the model."""
    dec = model.__dict__.get("_qlk_decoder")
    if dec is not None and all(a is b for a, b in zip(dec.projections, _projections(model))):
        return dec
    if why_not(model) is not None:
        model.__dict__.pop("_qlk_decoder", None)
        return None
    dec = Decoder(model)
    model.__dict__["_qlk_decoder"] = dec
    return dec
