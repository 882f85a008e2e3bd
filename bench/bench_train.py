"""Training speed, side by side: qlorakit (fast path and plain path) and the Hugging Face stack
(transformers + peft + bitsandbytes) on the same model, the same packed real text, the same
sequence length, batch and LoRA settings, in one run.

Each side runs in its own process, so its peak RSS is its own. Both sides take the very same
token batches (no padding: every token is a real token of a document), count the same tokens,
train with AdamW (lr 2e-4, clipping 0.3) in the same precision, and exclude the same warmup steps
from the timing. The precision is bf16 (autocast on the HF side) where the CPU has bf16
instructions, else fp32 on both sides (``--precision``): on an AVX2-only CPU a bf16 matmul runs
several times slower than an fp32 one, and neither stack would be run in bf16 there. Model FLOPs
utilisation is ``tokens/s x 4 x matmul parameters`` over the matmul rate (2048^3) in that precision
measured in the same run.

    python bench/bench_train.py                       # SmolLM2-135M, 4 x 512, r=16, dropout 0
    python bench/bench_train.py --dropout 0.05 --out bench/results/train_speed_dropout.md
    python bench/bench_train.py --nproc 2 --out bench/results/train_speed_nproc2.md   # every side data parallel

With ``--nproc N`` every side runs data parallel in N processes (torchrun, gloo): each process takes
1/N of every step's sequences, the gradients are summed over the processes once per step (the
all-reduce of ``qlorakit train --nproc``, on both sides), and the cores are shared equally. Peak
RSS is then the sum of the processes' peaks, and the CPU-clock columns count every process's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common import (  # noqa: E402
    REPO,
    add_precision_arg,
    precision_dtype,
    resolve_precision,
    cpu_name,
    matmul_tflops,
    model_flops_per_token,
    packed_text_batches,
    peak_rss_mb,
    run_worker,
    write_atomic,
)

SIDES = ("qlorakit", "qlorakit-plain", "hf")


def _folder(model: str) -> Path:
    from qlorakit.models import resolve_base

    return resolve_base(model)[0]


# --------------------------------------------------------------------------------------------
# workers


def _qlorakit_setup(a: argparse.Namespace, fast: bool) -> tuple[Any, Any, Any, list[torch.nn.Parameter]]:
    from qlorakit.config import load_recipe
    from qlorakit.lora import attach_lora, lora_parameters
    from qlorakit.models import load_base_model
    from qlorakit.train.loop import choose_checkpointing
    from qlorakit.train.loss import plain_loss

    recipe = load_recipe(None, [f"model.base={a.model}", f"model.compute_dtype={a.precision}", f"lora.r={a.r}", f"lora.alpha={2 * a.r}",
                                f"lora.dropout={a.dropout}", f"data.max_seq_len={a.seq_len}",
                                f"train.micro_batch_size={a.batch}", f"train.fast={str(fast).lower()}",
                                'train.gradient_checkpointing="off"'])
    loaded = load_base_model(recipe.model)
    model = loaded.model
    torch.manual_seed(0)
    attach_lora(model, recipe.lora)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    use_gc = choose_checkpointing(recipe, model)
    if fast:
        from qlorakit.train.fast import prepare_fast

        loss_fn = prepare_fast(model, recipe, loaded, checkpointing=use_gc)
    else:
        loss_fn = plain_loss
    model.train()
    return loaded, model, loss_fn, params


def _hf_setup(a: argparse.Namespace) -> tuple[Any, Any, list[torch.nn.Parameter]]:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = _folder(a.model)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=precision_dtype(a.precision))
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=bnb, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model.config.use_cache = False
    # as QLoRA scripts do; activation checkpointing off, as on the qlorakit side
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = peft.LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=a.dropout, target_modules="all-linear",
                          bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, tok, params


def worker(a: argparse.Namespace) -> None:
    from qlorakit.train.distributed import cores_per_process, world_from_env

    group = world_from_env()  # several processes under torchrun (--nproc), else one
    group.start(want_cuda=False)
    torch.set_num_threads(a.threads or cores_per_process())
    t0 = time.perf_counter()
    if a.side == "hf":
        model, tok, params = _hf_setup(a)

        def loss_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
            n = int((batch["labels"][:, 1:] != -100).sum())
            return out.loss, n
    else:
        from qlorakit.train.loop import autocast_ctx

        loaded, model, loss_fn, params = _qlorakit_setup(a, fast=a.side == "qlorakit")
        tok = loaded.tokenizer

        def loss_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
            with autocast_ctx(loaded):
                s, n = loss_fn(model, batch)
            return s / max(1, n), n
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    batches = packed_text_batches(tok, a.seq_len, a.batch, a.warmup + a.steps)
    if a.batch % group.world:
        raise SystemExit(f"--batch {a.batch} does not split into {group.world} processes")
    share = a.batch // group.world
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)

    cpu_secs: list[float] = []

    def step(batch: dict[str, torch.Tensor]) -> tuple[float, float, int]:
        t, c = time.perf_counter(), time.process_time()
        mine = {k: v[group.rank * share:(group.rank + 1) * share] for k, v in batch.items()}
        loss, _ = loss_of(mine)  # the mean over this process's sequences; the step takes the processes' mean, as DDP does
        (loss / group.world).backward()
        (total,) = group.sum_grads_(params, [float(loss.detach()) / group.world])
        loss = torch.tensor(total)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        cpu_secs.append(time.process_time() - c)
        return time.perf_counter() - t, float(loss.detach()), int(batch["input_ids"].numel())

    warm = [step(b) for b in batches[:a.warmup]]
    timed, probes = [], []
    for b in batches[a.warmup:]:
        timed.append(step(b))
        # the machine's rate drifts over minutes on shared hosts: sampled between the timed steps, it
        # shows the rate this side had (every process probes at once, after the step's all-reduce)
        if a.probe_s > 0:
            probes.append(matmul_tflops(seconds=a.probe_s, dtype=precision_dtype(a.precision)))
    tokens = sum(n for _, _, n in timed)
    secs = sum(t for t, _, _ in timed)
    cpu = sum(group.gather(sum(cpu_secs[a.warmup:])))  # every process's CPU time
    peaks = group.gather((rss_loaded, peak_rss_mb()))
    # the machine's rate at each probe: the processes' concurrent rates summed
    rates = [sum(x) for x in zip(*group.gather(probes))]
    group.close()
    if not group.main:
        return
    res = {
        "side": a.side, "tokens_per_s": tokens / secs, "tokens_per_cpu_s": tokens / cpu,
        "step_s_median": statistics.median(t for t, _, _ in timed),
        "step_s": [round(t, 3) for t, _, _ in timed], "warmup_s": [round(t, 2) for t, _, _ in warm],
        "losses": [round(x, 5) for _, x, _ in warm + timed], "load_s": round(load_s, 1),
        "rss_after_load_mb": round(sum(x for x, _ in peaks), 1), "peak_rss_mb": round(sum(y for _, y in peaks), 1),
        "tokens_timed": tokens, "threads": torch.get_num_threads(), "processes": group.world,
        "matmul_tflops_probes": [round(x, 3) for x in rates],
        "matmul_tflops_side": statistics.median(rates) if rates else None,
    }
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------
# the side-by-side run


def _table(results: list[dict[str, Any]], peak: float, cpu_peak: float, flops_tok: float) -> str:
    hf = next((r for r in results if r["side"] == "hf"), None)

    def _mfu(tokens_per_s: float, tflops: float) -> str:
        return f"{100 * tokens_per_s * flops_tok / (tflops * 1e12):.1f}%"

    rows = ["| side | trained tokens/s | vs HF | MFU | tokens per CPU-second | vs HF | MFU (CPU clock) | matmul rate during the side (TFLOP/s) | MFU at that rate | step (s, median) | peak RSS (MB) | RSS vs HF | RSS after load (MB) | first loss | warmup steps (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "-"
        cratio = f"{r['tokens_per_cpu_s'] / hf['tokens_per_cpu_s']:.2f}x" if hf else "-"
        rss = f"{r['peak_rss_mb'] / hf['peak_rss_mb']:.2f}" if hf else "-"
        side_rate = r.get("matmul_tflops_side")
        srate, smfu = (f"{side_rate:.2f}", _mfu(r["tokens_per_s"], side_rate)) if side_rate else ("-", "-")
        rows.append(f"| {r['side']} | {r['tokens_per_s']:.0f} | {ratio} | {_mfu(r['tokens_per_s'], peak)} | "
                    f"{r['tokens_per_cpu_s']:.0f} | {cratio} | {_mfu(r['tokens_per_cpu_s'], cpu_peak)} | {srate} | {smfu} | "
                    f"{r['step_s_median']:.2f} | {r['peak_rss_mb']:.0f} | {rss} | "
                    f"{r['rss_after_load_mb']:.0f} | {r['losses'][0]:.4f} | {', '.join(str(x) for x in r['warmup_s'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="qlorakit model.base (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (one micro-batch)")
    ap.add_argument("--r", "--lora-r", dest="r", type=int, default=16, help="LoRA rank (alpha = 2 r), on all linear layers")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout, the same on every side")
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from timing on every side")
    ap.add_argument("--steps", type=int, default=10, help="timed steps on every side")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (default: all cores, shared "
                    "equally by the processes)")
    ap.add_argument("--nproc", type=int, default=1, help="processes per side, data parallel through torchrun")
    add_precision_arg(ap)
    ap.add_argument("--probe-s", type=float, default=0.5,
                    help="seconds of matmul-rate probe after every step of a side (0: none); not in the step times")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {SIDES}")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_speed.md"))
    ap.add_argument("--json", default=str(REPO / "bench" / "out" / "train_speed.json"))
    ap.add_argument("--side", help=argparse.SUPPRESS)  # worker mode
    a = ap.parse_args(argv)
    if a.side:
        worker(a)
        return 0

    sides = [s for s in a.sides.split(",") if s]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        ap.error(f"--sides: unknown {bad}; choose from {SIDES}")
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    a.precision = resolve_precision(a.precision)
    dt = precision_dtype(a.precision)
    load_before = os.getloadavg()
    peak0 = matmul_tflops(dtype=dt)
    cpu_peak0 = matmul_tflops(clock="cpu", dtype=dt)
    common = ["--model", a.model, "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--lora-r", str(a.r),
              "--dropout", str(a.dropout), "--warmup", str(a.warmup), "--steps", str(a.steps),
              "--threads", str(a.threads), "--precision", a.precision, "--probe-s", str(a.probe_s)]
    results = []
    for s in sides:
        print(f"running {s} ...", file=sys.stderr, flush=True)
        r = run_worker(Path(__file__), ["--side", s, *common], timeout=3600, nproc=a.nproc)
        print(f"  {s}: {r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        results.append(r)
    peak1 = matmul_tflops(dtype=dt)
    cpu_peak = max(cpu_peak0, matmul_tflops(clock="cpu", dtype=dt))
    peak = max(peak0, peak1)
    load_after = os.getloadavg()

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(_folder(a.model)))
    flops_tok = model_flops_per_token(cfg)
    cmd = "python bench/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [
        "# Training speed: qlorakit vs the Hugging Face stack\n",
        f"Command: `{cmd.strip()}`  ",
        f"CPU: {cpu_name()}; torch {torch.__version__}, "
        f"{f'{a.nproc} processes (data parallel, gloo) x ' if a.nproc > 1 else ''}"
        f"{results[0]['threads'] if results else '?'} threads; "
        f"load average before/after {load_before[0]:.2f}/{load_after[0]:.2f}  ",
        f"Model: {a.model} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); batch {a.batch} x {a.seq_len} "
        f"packed real text, no padding; LoRA r={a.r}, alpha={2 * a.r}, dropout {a.dropout}, all linear layers; "
        f"{a.warmup} warmup + {a.steps} timed steps per side; AdamW, clipping 0.3, {a.precision}.  ",
        f"{a.precision} matmul rate (2048^3) measured in this run: {peak:.2f} TFLOP/s wall clock (before {peak0:.2f}, after "
        f"{peak1:.2f}), {cpu_peak:.2f} TFLOP per CPU-second; "
        f"model FLOPs per token 4 x {flops_tok / 4 / 1e6:.1f}M matmul parameters = {flops_tok / 1e6:.0f} MFLOP.\n",
        _table(results, peak, cpu_peak, flops_tok),
        "",
        "Sides: `qlorakit` is the training step of `qlorakit train` with `train.fast=true` (the default); "
        "`qlorakit-plain` is the same loop with `train.fast=false` (HF forward under autocast, full logits); "
        "`hf` is transformers + peft (`prepare_model_for_kbit_training`, `get_peft_model`, "
        "`target_modules=\"all-linear\"`) + bitsandbytes NF4 (double quant, compute in the run's precision) in a "
        "plain loop (under bf16 autocast when the precision is bf16), with the same AdamW settings. Peak RSS is the whole process, loading included. "
        "MFU counts 4 x matmul parameters per token (LoRA and attention-score FLOPs left out). The CPU-clock "
        "columns divide by the process's CPU time instead of wall time (tokens per CPU-second, and MFU against "
        "the matmul rate per CPU-second): on a machine shared with other jobs they show the work each side "
        "needs, where wall-clock figures also show how much of the machine the side happened to get. "
        "MFU is against the best matmul rate measured before and after all the sides; the matmul rate during a "
        f"side is the median of {a.probe_s:g} s probes (best 2048^3 matmul, summed over the processes) taken "
        "after each of its timed steps, outside their times, and the next column is MFU against it: the rate "
        "of a shared machine drifts over minutes, so that a side's MFU against the run's best rate also shows "
        "how fast the machine happened to be while it ran.",
    ]
    text = "\n".join(md) + "\n"
    write_atomic(Path(a.out), text)
    write_atomic(Path(a.json), json.dumps({"args": vars(a), "peak_tflops": peak, "cpu_peak_tflops": cpu_peak,
                                             "peak_before": peak0,
                                             "peak_after": peak1, "flops_per_token": flops_tok,
                                             "load_before": load_before, "load_after": load_after,
                                             "cpu": cpu_name(), "results": results}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
