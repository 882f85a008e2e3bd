"""Shared pieces of the training-speed benchmarks: packed real text, model shapes, the machine's
bf16 matmul rate, FLOPs per token, memory, and writing result files atomically."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "REPO",
    "shared_data_dir",
    "packed_text_batches",
    "matmul_tflops",
    "model_flops_per_token",
    "matmul_params",
    "peak_rss_mb",
    "cpu_name",
    "write_atomic",
    "SMOLLM2_SHAPES",
    "random_model_folder",
    "run_worker",
]

REPO = Path(__file__).resolve().parents[1]

# SmolLM2 shapes (hidden, layers, heads, kv heads, intermediate); vocab 49152, tied embeddings
SMOLLM2_SHAPES: dict[str, dict[str, int]] = {
    "135M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    "360M": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560),
    "1.7B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192),
}


def shared_data_dir() -> Path:
    env = os.environ.get("QLORAKIT_SHARED_DATA")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    if not p.is_dir():
        raise SystemExit(f"shared data folder {p} not found; set QLORAKIT_SHARED_DATA")
    return p


def _documents() -> list[str]:
    """Real English text: OpenAssistant questions with their answers, then Self-Instruct tasks."""
    base = shared_data_dir() / "instruction"
    docs: list[str] = []
    with open(base / "oasst1_val_en.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            docs.append(f"{r['input']} {r['output']}")
    for name in ("self_instruct_user_oriented.jsonl", "self_instruct_seed_tasks.jsonl"):
        with open(base / name, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                for inst in r.get("instances", []):
                    docs.append(f"{r['instruction']}\n{inst.get('input', '')}\n{inst.get('output', '')}")
    return docs


def packed_text_batches(tokenizer: Any, seq_len: int, batch: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches of (batch, seq_len) tokens with no padding at all.

    Documents (each ending with EOS) are concatenated and cut into rows of exactly ``seq_len``;
    ``position_ids`` restart at 0 at every document start and every row start, so attention stays
    inside a document, as packed training does. Every token but a segment's first is a label.
    Both sides of a benchmark get the same tensors.
    """
    need = seq_len * batch * n_batches
    ids: list[int] = []
    pos: list[int] = []
    docs = _documents()
    i = 0
    while len(ids) < need:
        toks = tokenizer(docs[i % len(docs)], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += toks
        pos += list(range(len(toks)))
        i += 1
    t_ids = torch.tensor(ids[:need]).view(n_batches * batch, seq_len)
    t_pos = torch.tensor(pos[:need]).view(n_batches * batch, seq_len)
    # a row start is a segment start: renumber the positions of a document cut by a row boundary
    for r in range(t_pos.shape[0]):
        row = t_pos[r]
        if row[0] != 0:
            first_zero = int((row == 0).nonzero()[0]) if bool((row == 0).any()) else seq_len
            row[:first_zero] = torch.arange(first_zero)
    labels = t_ids.clone()
    labels[t_pos == 0] = -100
    out = []
    for b in range(n_batches):
        sl = slice(b * batch, (b + 1) * batch)
        out.append({"input_ids": t_ids[sl].clone(), "position_ids": t_pos[sl].clone(), "labels": labels[sl].clone()})
    return out


def matmul_tflops(size: int = 2048, seconds: float = 3.0, clock: str = "wall", device: str = "cpu",
                  dtype: torch.dtype = torch.bfloat16) -> float:
    """The machine's matmul rate (size^3, best of repeated runs) in TFLOP/s, on ``device``, in
    ``dtype`` (bf16 unless told otherwise).

    ``clock="cpu"`` divides by the process's CPU time instead of wall time: the rate per busy core,
    which a machine shared with other jobs distorts far less than wall time.
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = timer()
        a @ b
        sync()
        best = min(best, timer() - t)
    return 2 * size ** 3 / best / 1e12


def matmul_params(cfg: Any) -> int:
    """Parameters that take part in a matmul per token: every linear of the decoder and the head."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter
    return layers * per_layer + cfg.vocab_size * h


def model_flops_per_token(cfg: Any) -> float:
    """4 x matmul parameters: forward (2) and the input gradient (2) of a frozen base.

    LoRA and attention-score FLOPs are left out, so utilisation figures are conservative.
    """
    return 4.0 * matmul_params(cfg)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")  # Linux; elsewhere the platform's processor string
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def random_model_folder(shape: str, seed: int = 0) -> Path:
    """A random-initialised SmolLM2-shaped model saved once as a bf16 safetensors folder (cached)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlorakit.models import cache_dir, resolve_base

    if shape not in SMOLLM2_SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {sorted(SMOLLM2_SHAPES)}")
    folder = cache_dir() / "bench-models" / f"smollm2-{shape}-random-{seed}"
    if (folder / "config.json").is_file():
        return folder
    default, _ = resolve_base("default")
    base_cfg = LlamaConfig.from_pretrained(str(default))
    cfg = LlamaConfig(**{**base_cfg.to_dict(), **SMOLLM2_SHAPES[shape], "head_dim": None})
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never a full fp32 copy of a large model
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    tmp = folder.with_name(f".{folder.name}.tmp")
    model.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(default)).save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder


def run_worker(script: Path, args: list[str], timeout: float, nproc: int = 1) -> dict[str, Any]:
    """Run one side of a benchmark in its own process (so peak RSS is its own); return its JSON line.
    With ``nproc`` > 1 the side runs in that many processes through torchrun (the first one reports)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launcher = [sys.executable]
    if nproc > 1:
        from qlorakit.train.distributed import cores_per_process

        env.setdefault("OMP_NUM_THREADS", str(cores_per_process(nproc)))
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([*launcher, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "")[-3000:]
        raise RuntimeError(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def add_precision_arg(ap: Any) -> None:
    """``--precision auto|bf16|fp32`` on a side-by-side benchmark: the compute precision of every side."""
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="compute precision of every side; auto: bf16 where the CPU has bf16 instructions, else fp32")


def resolve_precision(precision: str) -> str:
    """``auto`` as qlorakit's loader resolves it on this CPU: bf16 with bf16 instructions, else fp32
    (on an AVX2-only CPU neither stack would run bf16 matmuls, several times slower than fp32 there)."""
    if precision != "auto":
        return precision
    from qlorakit.quant import cpu_supports_bf16

    return "bf16" if cpu_supports_bf16() else "fp32"


def precision_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


def settle(max_s: float) -> tuple[float, float]:
    """Wait until the 1-minute load average is at most half the cores, or ``max_s`` seconds;
    (seconds waited, load average then)."""
    t0 = time.monotonic()
    limit = 0.5 * (os.cpu_count() or 1)
    while os.getloadavg()[0] > limit and time.monotonic() - t0 < max_s:
        time.sleep(2.0)
    return time.monotonic() - t0, os.getloadavg()[0]


def git_commit() -> str:
    """The repository's commit, and whether tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError) as e:
        return f"unknown ({e})"
    return rev + (" with uncommitted changes" if dirty else "")
