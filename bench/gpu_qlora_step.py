"""One QLoRA training step on a GPU, side by side: the Hugging Face stack (transformers + peft +
bitsandbytes) and qlorakit, on random-initialised Llama models of real shapes with an NF4
(double-quantized, bf16 compute) base and LoRA r=16 (alpha 32, dropout 0) on every linear layer.

Sides:

- ``hf``: peft's LoRA on the bitsandbytes model, HF's loss, under bf16 autocast.
- ``qlorakit``: qlorakit's LoRA layers and chunked loss (what ``qlorakit train`` runs on a GPU).
- ``qlorakit-fast``: the fast path (:class:`qlorakit.train.fast.FastModel`) run on the GPU, the
  base held as a bf16 copy (``weights="cache"``); ``qlorakit-fast-per-use`` dequantizes each
  weight when it is used instead, as the HF stack does, and holds no copy.

Each side runs in its own process (peak memory is its own). Every side builds the same seeded
random model, quantizes its linears with bitsandbytes, and runs warmup steps (not timed) and then
timed steps of forward, backward, clipping and AdamW on the same token batch. The LoRA B matrices
start at zero, so every side's first loss is the base model's loss: the "first loss" column must
agree across sides. A probe process records the versions, the device and its bf16 matmul rate;
MFU counts 4 x matmul parameters per token against that rate, as in the CPU tables.

    python bench/gpu_qlora_step.py --out OUTDIR              # the shapes below, on CUDA
    python bench/gpu_qlora_step.py --device cpu --shapes tiny --out /tmp/x   # a check on a CPU

It writes ``results.json`` after each side and ``gpu.md`` (a section for ``bench/results/``) at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

from common import matmul_tflops, model_flops_per_token, peak_rss_mb, run_worker  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    "1.7B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, vocab_size=49152),  # SmolLM2-1.7B
    "8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),  # Llama-3-8B
}
SIDES = ("hf", "qlorakit", "qlorakit-fast", "qlorakit-fast-per-use")


def _build(shape: str, device: str, seed: int = 0) -> Any:
    """A seeded random Llama of ``shape`` with bitsandbytes NF4 linears, built on ``device`` layer by
    layer (a full-precision copy of the whole model never exists)."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(shape_: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape_, generator=g, device=device, dtype=torch.float32).mul_(0.02)

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4", device="meta")
                    w = rand((lin.out_features, lin.in_features)).to(torch.bfloat16).float()
                    q.weight = bnb.nn.Params4bit(w.cpu() if device == "cpu" else w, requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4")
                    q = q.to(device)  # quantizes
                    if device == "cpu":
                        q.support_avx512bf16_for_cpu = False
                    setattr(parent, name, q)
    # what is left on the meta device: embeddings, the head, norms (fp32), rotary buffers
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                data = torch.ones(p.shape, device=device) if p.dim() == 1 else rand(tuple(p.shape))
                setattr(mod, pname, torch.nn.Parameter(data, requires_grad=False))
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def _batch(vocab: int, batch: int, seq: int, device: str) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    pos = torch.arange(seq).repeat(batch, 1)
    labels = ids.clone()
    labels[:, 0] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "labels": labels, "position_ids": pos}.items()}


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    dev = a.device
    cuda = dev.startswith("cuda")
    t0 = time.perf_counter()
    model = _build(a.shape, dev)
    build_s = time.perf_counter() - t0
    batch = _batch(SHAPES[a.shape]["vocab_size"], a.batch, a.seq, dev)
    if a.side == "hf":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_of() -> Any:
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
                return model(**batch).loss
    else:
        from qlorakit.config import LoraConfig
        from qlorakit.lora import attach_lora, lora_parameters
        from qlorakit.train.loss import chunked_loss

        torch.manual_seed(0)
        attach_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0))
        params = lora_parameters(model)
        for p in params:
            p.requires_grad_(True)
        if a.side.startswith("qlorakit-fast"):
            from qlorakit.train.fast import FastModel, FastOptions

            mode = "per-use" if a.side.endswith("per-use") else "cache"
            fn: Any = FastModel(model, FastOptions(weights=mode, compile=False), pad_token_id=None)
        else:
            fn = chunked_loss

        def loss_of() -> Any:
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
                s, n = fn(model, batch)
            return s / n
    model.train()
    opt = torch.optim.AdamW(params, lr=2e-4)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    losses: list[float] = []
    grad_norms: list[float] = []

    def step() -> float:
        sync()
        t = time.perf_counter()
        loss = loss_of()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t
        losses.append(float(loss.detach()))
        grad_norms.append(float(norm))
        return dt

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = [step() for _ in range(a.warmup)]
    times = [step() for _ in range(a.steps)]
    tokens = a.batch * a.seq
    best = min(times)
    return {"side": a.side, "shape": a.shape, "batch": a.batch, "seq": a.seq, "build_s": round(build_s, 1),
            "warmup_s": [round(t, 3) for t in warm], "step_s": [round(t, 4) for t in times],
            "step_s_median": sorted(times)[len(times) // 2], "tokens_per_s": tokens / (sum(times) / len(times)),
            "tokens_per_s_best": tokens / best,
            "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5),
            "grad_norm_first": round(grad_norms[0], 5),
            "trainable": sum(p.numel() for p in params),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def probe(device: str) -> dict[str, Any]:
    """Versions, the device, and its bf16 matmul rate (TFLOP/s)."""
    import platform

    import bitsandbytes
    import peft
    import torch
    import transformers

    cuda = device.startswith("cuda")
    size = 8192 if cuda else 2048
    name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    return {"device": name, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "matmul_size": size,
            "matmul_tflops": round(matmul_tflops(size, seconds=2.0, device=device), 1)}


def _run(args: list[str], timeout: float) -> dict[str, Any]:
    """One worker process's result, or the error it ended with (the run goes on with the next)."""
    try:
        return run_worker(Path(__file__).resolve(), args, timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    except RuntimeError as e:
        return {"error": str(e)[-1500:]}


def table(results: list[dict[str, Any]], shapes: list[str], peak_tflops: float | None) -> str:
    rows = ["| shape | side | batch x seq | step (s, median) | tokens/s | vs HF | MFU | peak GPU memory (MB) | vs HF | "
            "first loss | first gradient norm | loss after the steps |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        hf = next((r for r in results if r["shape"] == shape and r["side"] == "hf" and "error" not in r), None)
        flops_tok = model_flops_per_token(SimpleNamespace(**SHAPES[shape]))
        for r in (x for x in results if x["shape"] == shape):
            if "error" in r:
                last = r["error"].strip().splitlines()[-1][:160] if r["error"].strip() else "?"
                rows.append(f"| {shape} | {r['side']} | - | - | - | - | - | - | - | - | - | failed: {last} |")
                continue
            ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
            mfu = f"{100 * r['tokens_per_s'] * flops_tok / (peak_tflops * 1e12):.1f}%" if peak_tflops else "-"
            mem = r["peak_gpu_mb"]
            mem_ratio = f"{mem / hf['peak_gpu_mb']:.2f}x" if hf and mem and hf["peak_gpu_mb"] else "-"
            rows.append(f"| {shape} | {r['side']} | {r['batch']} x {r['seq']} | {r['step_s_median']:.3f} | "
                        f"{r['tokens_per_s']:.0f} | {ratio} | {mfu} | {mem if mem is not None else '-'} | {mem_ratio} | "
                        f"{r['loss_first']:.4f} | {r['grad_norm_first']:.4g} | {r['loss_last']:.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json and gpu.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="1.7B,8B")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=240, help="seconds allowed per side and shape")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe:
        print("RESULT " + json.dumps(probe(a.device)), flush=True)
        return 0
    if a.side:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    me = ["--out", a.out, "--device", a.device]
    info = _run(me + ["--probe"], a.timeout)
    print("PROBE " + json.dumps(info), flush=True)
    shapes = a.shapes.split(",")
    results: list[dict[str, Any]] = []
    for shape in shapes:
        for side in a.sides.split(","):
            t = time.perf_counter()
            r = _run(me + ["--side", side, "--shape", shape, "--batch", str(a.batch), "--seq", str(a.seq),
                           "--warmup", str(a.warmup), "--steps", str(a.steps)], a.timeout)
            r.update(side=side, shape=shape, wall_s=round(time.perf_counter() - t, 1))
            results.append(r)
            shown = {k: v for k, v in r.items() if k != "error"}
            if "error" in r:
                shown["error"] = r["error"][-600:]
            print(json.dumps(shown), flush=True)
            (out / "results.json").write_text(json.dumps({"probe": info, "results": results}, indent=2) + "\n")
    peak = info.get("matmul_tflops")
    cmd = "python bench/gpu_qlora_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        "# QLoRA training step on a GPU, qlorakit and the Hugging Face stack side by side", "",
        f"Command: `{cmd}` (via `bench/gpu_run.sh`), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
        f"Device: {info.get('device', '?')}; Python {info.get('python', '?')}, torch {info.get('torch', '?')} "
        f"(CUDA {info.get('cuda', '?')}), transformers {info.get('transformers', '?')}, peft {info.get('peft', '?')}, "
        f"bitsandbytes {info.get('bitsandbytes', '?')}. Measured bf16 matmul rate "
        f"({info.get('matmul_size', '?')}^3, best of 20): {peak if peak else '?'} TFLOP/s.", "",
        "Random-initialised Llama models of the SmolLM2-1.7B and Llama-3-8B shapes, NF4 double-quantized base "
        "(bf16 compute), LoRA r=16 alpha 32 dropout 0 on every linear layer, one batch of random tokens, "
        f"{a.warmup} warmup steps then {a.steps} timed steps (forward, backward, clipping, AdamW), each side "
        "in its own process. MFU counts 4 x matmul parameters per token (LoRA and attention-score FLOPs left "
        "out). The first loss is the base model's (LoRA B starts at zero), so it must agree across sides; "
        "the qlorakit sides also share their LoRA initialisation (peft draws its own), so their first "
        "gradient norms must agree too.", "",
        table(results, shapes, peak), ""]
    (out / "gpu.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
