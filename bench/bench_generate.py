"""Generation speed with an adapter, side by side: ``qlorakit.models.generate`` and ``generate`` on
the Hugging Face stack (transformers + peft + bitsandbytes NF4), same base, same adapter, same
prompts, greedy, the same number of new tokens; the texts are compared.

The adapter is by default a fixed random one (seeded, B non-zero, so it changes the output) saved in
the PEFT format, or a trained one (``--adapter``); every side loads that folder. Sides: ``qlorakit``; ``hf``, the stack as it comes (on a CPU
with AVX512-BF16, bitsandbytes repacks each 4-bit weight at the first no-grad forward and runs its
own fused kernel, whose rounding differs from dequantize-then-matmul); ``hf-unpacked``, the same
stack with that repacking off (``support_avx512bf16_for_cpu = False`` on every ``Linear4bit``, the
setting that keeps LoRA gradients right after an evaluation pass, and the numerics qlorakit uses).
The qlorakit side runs its fast decoder (``qlorakit.models.decode``), which on such a CPU calls
bitsandbytes' packed kernel itself, so its text is compared with ``hf`` token for token. Each side runs
in its own process; a short warm-up generation is excluded from the timing on every
side. Both stacks compute in bf16 where the CPU has bf16 instructions, else in fp32 (``--precision``).

    python bench/bench_generate.py            # writes bench/results/generation_speed.md
    python bench/bench_generate.py --adapter runs/<run>/adapter --prompts-file my_prompts.txt \
        --out /tmp/gen.md                     # a trained adapter, your own prompts (one per line)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common import (REPO, add_precision_arg, cpu_name, peak_rss_mb, precision_dtype, resolve_precision,  # noqa: E402
                    run_worker, write_atomic)

PROMPTS = [
    "How do I return a bike that arrived with a bent wheel?",
    "Explain in two sentences why the sky is blue.",
    "Write a short, friendly reply to a customer asking when the shop opens on Sunday.",
]


def make_adapter(folder: Path, model: str, r: int = 16, seed: int = 0, std: float = 0.02) -> Path:
    """A seeded random LoRA adapter on every linear layer, in the PEFT format (made once)."""
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    from qlorakit.config import load_recipe
    from qlorakit.lora import attach_lora, lora_parameters, save_adapter
    from qlorakit.models import load_base_model

    recipe = load_recipe(None, [f"model.base={model}", f"lora.r={r}", f"lora.alpha={2 * r}"])
    loaded = load_base_model(recipe.model)
    attach_lora(loaded.model, recipe.lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(loaded.model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    save_adapter(loaded.model, folder, recipe.lora, base_name=loaded.name)
    return folder


def _prompt_text(tok: Any, user: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def worker(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    t0 = time.perf_counter()
    if a.side in ("hf", "hf-unpacked"):
        import bitsandbytes
        import peft
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from qlorakit.models import resolve_base

        folder = resolve_base(a.model)[0]
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=precision_dtype(a.precision))
        base = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=bnb, dtype=torch.float32,
                                                    device_map={"": "cpu"})
        if a.side == "hf-unpacked":
            for m in base.modules():
                if isinstance(m, bitsandbytes.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False
        model = peft.PeftModel.from_pretrained(base, a.adapter)
        model.eval()
        tok = AutoTokenizer.from_pretrained(str(folder))

        def gen(prompt: str, n: int) -> tuple[str, int]:
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            new = out[0, enc["input_ids"].shape[1]:]
            return tok.decode(new, skip_special_tokens=True), int(new.numel())
    else:
        from qlorakit.config import load_recipe
        from qlorakit.lora import load_adapter
        from qlorakit.models import generate, load_base_model

        loaded = load_base_model(load_recipe(None, [f"model.base={a.model}", f"model.compute_dtype={a.precision}"]).model)
        load_adapter(loaded.model, a.adapter)
        model, tok = loaded.model, loaded.tokenizer
        if a.side == "qlorakit-uncached":  # the generation path before the bf16 weight cache
            model._qlk_inference_ready = True

        def gen(prompt: str, n: int) -> tuple[str, int]:
            res = generate(model, tok, prompt, max_new_tokens=n, min_new_tokens=n)
            return res.text, res.completion_tokens
    load_s = time.perf_counter() - t0
    prompts = [_prompt_text(tok, p) for p in chosen_prompts(a)]
    t = time.perf_counter()
    gen(prompts[0], 4)  # warm-up (caches, first-call costs), excluded from the timing
    warm_s = time.perf_counter() - t
    texts, secs, tokens = [], 0.0, 0
    for p in prompts:
        t = time.perf_counter()
        text, n = gen(p, a.new_tokens)
        secs += time.perf_counter() - t
        tokens += n
        texts.append(text)
    print("RESULT " + json.dumps({"side": a.side, "tokens_per_s": tokens / secs, "tokens": tokens, "seconds": secs,
                                  "texts": texts, "load_s": round(load_s, 1), "warmup_s": round(warm_s, 2),
                                  "peak_rss_mb": round(peak_rss_mb(), 1), "threads": torch.get_num_threads()}),
          flush=True)


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of ``path``, one user prompt each."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SystemExit(f"--prompts-file {path}: cannot read it ({e.strerror or e})") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SystemExit(f"--prompts-file {path}: no prompt in it (expected one prompt per non-empty line)")
    return prompts


def chosen_prompts(a: argparse.Namespace) -> list[str]:
    """The prompts of this run: those of ``--prompts-file`` when given, else the first ``--prompts`` built-in ones."""
    return read_prompts(a.prompts_file) if a.prompts_file else PROMPTS[:a.prompts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--adapter", default=str(REPO / "bench" / "out" / "gen_adapter"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=3, help="how many of the built-in prompts to run")
    ap.add_argument("--prompts-file", help="run these prompts instead: a text file, one user prompt per line")
    ap.add_argument("--threads", type=int, default=0)
    add_precision_arg(ap)
    ap.add_argument("--sides", default="qlorakit,hf,hf-unpacked")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "generation_speed.md"))
    ap.add_argument("--json", default=str(REPO / "bench" / "out" / "generation_speed.json"))
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        worker(a)
        return 0
    prompts = chosen_prompts(a)  # a bad --prompts-file fails here, before any side loads a model
    a.precision = resolve_precision(a.precision)
    made = not (Path(a.adapter) / "adapter_model.safetensors").is_file()
    make_adapter(Path(a.adapter), a.model)
    common = ["--model", a.model, "--adapter", a.adapter, "--new-tokens", str(a.new_tokens), "--prompts",
              str(a.prompts), "--threads", str(a.threads), "--precision", a.precision]
    if a.prompts_file:
        common += ["--prompts-file", str(Path(a.prompts_file).resolve())]
    load_before = os.getloadavg()
    results = {s: run_worker(Path(__file__), ["--side", s, *common], timeout=3600) for s in a.sides.split(",")}
    load_after = os.getloadavg()
    refs = [s for s in ("hf", "hf-unpacked") if s in results]
    head = "| side | new tokens/s | tokens | seconds | peak RSS (MB) |"
    head += "".join(f" vs {s} | same text as {s} |" for s in refs)
    rows = [head, "|---|---:|---:|---:|---:|" + "---:|---|" * len(refs)]
    for s, r in results.items():
        row = f"| {s} | {r['tokens_per_s']:.1f} | {r['tokens']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        for ref in refs:
            h = results[ref]
            same = f"{sum(x == y for x, y in zip(r['texts'], h['texts']))}/{len(r['texts'])} prompts"
            row += f" {r['tokens_per_s'] / h['tokens_per_s']:.2f}x | {'-' if s == ref else same} |"
        rows.append(row)
    cmd = "python bench/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    default_adapter = Path(a.adapter).resolve() == (REPO / "bench" / "out" / "gen_adapter").resolve()
    adapter_desc = ("seeded random LoRA r=16 on all linear layers (PEFT format)" if made or default_adapter
                    else f"`{a.adapter}` (PEFT format)")
    md = ["# Generation speed with an adapter: qlorakit vs the Hugging Face stack\n",
          f"Command: `{cmd.strip()}`  ",
          f"CPU: {cpu_name()}; torch {torch.__version__}; load average before/after {load_before[0]:.2f}/{load_after[0]:.2f}  ",
          f"Model: {a.model}; adapter: {adapter_desc}; "
          f"{len(prompts)} chat prompts, greedy, {a.new_tokens} new tokens each (no early stop); {a.precision} on every side.\n",
          "\n".join(rows), ""]
    for i, p in enumerate(prompts):
        md.append(f"Prompt {i + 1}: {p}")
        for s, r in results.items():
            md.append(f"- {s}: {json.dumps(r['texts'][i])}")
        md.append("")
    text = "\n".join(md)
    write_atomic(Path(a.out), text)
    write_atomic(Path(a.json), json.dumps(results, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
