"""The planner: its memory model counts what the fast path really keeps, its choices fit the budget,
and ``qlorakit plan`` runs end to end on a tiny model."""

from __future__ import annotations

import json
import time

import pytest
import torch

from qlorakit.train.memory import ModelShape, _fast_saved_per_token_layer, estimate_memory
from qlorakit.train.plan import GB, Settings, _candidates, choose_fast_options, plan_main, plan_run

SHAPE_135M = ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, inter=1536, vocab=49152, tied=True)


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"],
                                     ["o_proj", "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.k_proj"],
                                     ["gate_proj", "lm_head"]])
def test_parameter_counts_match_the_real_model(targets):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    s = ModelShape.from_config(cfg)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    assert s.linear_params == linear
    assert s.linear_params + s.other_params == sum(p.numel() for p in model.parameters())
    from qlorakit.config import LoraConfig
    from qlorakit.lora import attach_lora, lora_parameters
    from qlorakit.train.plan import lora_sites

    adapted = lora_sites(cfg, targets)  # before any adapter is attached, from the config alone
    names = attach_lora(model, LoraConfig(r=8, targets=targets))
    decoder = [p for n, m in model.named_modules() if n in names and not n.endswith("lm_head")
               for p in (m.lora_A.weight, m.lora_B.weight)]
    assert s.lora_params(8, adapted) == sum(p.numel() for p in decoder)
    if targets == ["all-linear"]:
        assert s.lora_params(8) == sum(p.numel() for p in lora_parameters(model))
    # the planner times its optimizer step on tensors of these shapes
    from qlorakit.train.plan import _calibration_model, _lora_shapes

    assert sorted(_lora_shapes(s, 8, adapted)) == sorted(tuple(p.shape) for p in decoder)
    # and its calibration model adapts the same kinds of linear
    cal, _ = _calibration_model(s, 1, 8, 16.0, 0.0, dtype=torch.float32, adapted=adapted)
    kinds = {n.rsplit(".", 1)[-1] for n, m in cal.named_modules() if hasattr(m, "lora_A")}
    assert kinds == {n.rsplit(".", 1)[-1] for n in names if not n.endswith("lm_head")}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_model_counts_what_the_fast_path_saves(dropout, precision):
    """Sum the bytes of every tensor autograd keeps during a fast forward; the formula must agree.
    With dropout too: its masks are regenerated in the backward, not kept. In fp32 (CPUs without
    bf16 instructions) the matmuls' activations take 4 bytes an element."""
    from test_fast_path import PAD, _batch, _tiny

    from qlorakit.train.fast import FastModel, FastOptions

    model = _tiny(dropout=dropout)
    batch = _batch(pad_tail=False)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    fm = FastModel(model, FastOptions(compile=False, dtype=dtype), pad_token_id=PAD)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    base_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    base_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    for L in fm.layers:  # frozen weights and norm vectors are not activations
        base_ptrs |= {L.in_w.untyped_storage().data_ptr(), L.post_w.untyped_storage().data_ptr()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)
        h, _ = fm.hidden(batch)
    kept = sum(n for p, n in seen.items() if p not in base_ptrs)
    s = ModelShape.from_config(model.config)
    tokens = int(batch["input_ids"].numel())
    want = s.layers * tokens * _fast_saved_per_token_layer(s, 8, 4 if precision == "fp32" else 2)
    # the final norm's input and the rotary tables are kept once per batch
    extra = tokens * (4 * s.hidden + 4) + 2 * tokens * s.head_dim * 4
    assert abs(kept - (want + extra)) <= 0.1 * want, (kept, want + extra)


def test_leaner_settings_need_less_memory():
    base = dict(micro_batch=4, seq_len=512, r=16, baseline=0.5 * GB)
    full = estimate_memory(SHAPE_135M, **base)
    ckpt = estimate_memory(SHAPE_135M, **base, checkpointing=True)
    per_use = estimate_memory(SHAPE_135M, **base, weights="per-use")
    small = estimate_memory(SHAPE_135M, **{**base, "micro_batch": 2})
    assert ckpt.peak < full.peak and per_use.peak < full.peak and small.peak < full.peak
    assert full.parts["bf16 copy of the base weights"] == SHAPE_135M.linear_params * 2
    assert "bf16 copy of the base weights" not in per_use.parts
    # in fp32 (CPUs without bf16 instructions) the copies and the activations take twice the bytes
    f32 = estimate_memory(SHAPE_135M, **base, act_bytes=4)
    assert f32.parts["fp32 copy of the base weights"] == SHAPE_135M.linear_params * 4
    assert f32.parts["fp32 copy of the output head"] == 2 * full.parts["bf16 copy of the output head"]
    assert (full.parts["activations kept for the backward"] < f32.parts["activations kept for the backward"]
            < 2 * full.parts["activations kept for the backward"])  # the fp32 residual stream is fp32 in both


def test_model_precision_follows_the_4bit_linears_compute_dtype():
    from test_fast_path import _tiny

    from qlorakit.quant import is_linear4bit
    from qlorakit.train.plan import model_precision

    model = _tiny()
    assert model_precision(model) == "bf16"
    for m in model.modules():
        if is_linear4bit(m):
            m.compute_dtype = torch.float32
    assert model_precision(model) == "fp32"
    assert _candidates(4, 512, 1, "auto", False, "fp32")[0].describe().count("fp32 copy") == 1


def test_candidates_go_from_fastest_to_leanest_and_keep_tokens_per_step():
    c = _candidates(4, 512, 1, "auto", False)
    assert c[0] == Settings(4, 1, 512, False, "cache", False)
    assert c[1] == Settings(4, 1, 512, True, "cache", False)
    assert all(s.micro_batch * s.grad_accum == 4 for s in c if s.seq_len == 512)
    assert c[-1].micro_batch == 1 and c[-1].seq_len == 128
    assert all(s.checkpointing for s in _candidates(4, 512, 1, "on", False))


def test_plan_picks_the_first_setting_that_fits_the_budget():
    common = dict(model_name="x", micro_batch=4, seq_len=512, grad_accum=1, r=16, alpha=32, dropout=0.0,
                  sample=None, calibrate_time=False, baseline=0.5 * GB, compile_=True)
    roomy = plan_run(SHAPE_135M, budget_bytes=64 * GB, **common)
    assert roomy.fits and roomy.settings == Settings(4, 1, 512, False, "cache", True)
    need_full = roomy.peak_bytes
    tight = plan_run(SHAPE_135M, budget_bytes=need_full * 0.9, **common)
    assert tight.fits and tight.peak_bytes <= need_full * 0.9
    assert tight.settings.checkpointing or tight.settings.weights == "per-use" or tight.settings.micro_batch < 4
    impossible = plan_run(SHAPE_135M, budget_bytes=0.1 * GB, **common)
    assert not impossible.fits


def test_fast_options_dequantize_per_use_when_the_budget_is_small():
    from test_fast_path import _tiny

    from qlorakit.config import load_recipe

    model = _tiny()
    roomy = choose_fast_options(load_recipe(None, ["train.memory_budget_gb=64"]), model, checkpointing=False)
    tight = choose_fast_options(load_recipe(None, ["train.memory_budget_gb=0.01"]), model, checkpointing=False)
    assert roomy.weights == "cache" and tight.weights == "per-use"
    assert not roomy.compile  # a tiny model never pays for compiling


def test_plan_command_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan_main([f"model.base={tiny_model_dir}", "train.max_steps=3", "data.max_seq_len=128",
                    "train.micro_batch_size=2", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "predicted peak" in text and "tokens/s" in text
    p = json.loads(out.read_text())
    assert p["fits"] and p["step_s"] > 0 and p["total_steps"] == 3
    assert p["calibration"]["layer_s"] >= 0
    # the command it prints runs the chosen settings: a valid recipe holding them and the budget
    import shlex

    from qlorakit.config import load_recipe

    line = next(ln for ln in text.splitlines() if ln.strip().startswith("to run it"))
    words = shlex.split(line.split("to run it", 1)[1])
    assert words[:2] == ["qlorakit", "train"]
    run = load_recipe(None, words[2:])
    s = p["settings"]
    assert run.model.base == str(tiny_model_dir) and run.train.max_steps == 3
    assert (run.train.micro_batch_size, run.train.grad_accum) == (s["micro_batch"], s["grad_accum"])
    assert run.train.gradient_checkpointing == ("on" if s["checkpointing"] else "off")
    assert abs(run.train.memory_budget_gb * GB - p["budget_bytes"]) <= 1e-3 * GB
    assert p["train_overrides"] == words[-len(p["train_overrides"]):]
    rc = plan_main([f"model.base={tiny_model_dir}", "--budget-gb", "0.01", "--no-calibrate"])
    assert rc == 1 and "DOES NOT FIT" in capsys.readouterr().out


def test_plan_for_several_processes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`qlorakit plan --nproc 2` plans what `qlorakit train --nproc 2` runs: each process gets half the
    budget and its share of the cores (the calibration runs with that many threads), a step holds
    both processes' tokens, an epoch half the steps; the command it prints says --nproc 2."""
    import os
    import shlex

    from qlorakit.config import load_recipe
    from qlorakit.train import plan as plan_mod

    import multiprocessing

    seen_threads, seen_others = [], []
    real = plan_mod.calibrate

    def spy(*args, **kw):
        seen_threads.append(torch.get_num_threads())
        # the other process trains alongside the calibration, and has run its first round already
        seen_others.append(sum(p.is_alive() for p in multiprocessing.active_children()))
        return real(*args, **kw)

    monkeypatch.setattr(plan_mod, "calibrate", spy)
    threads_before = torch.get_num_threads()
    args = [f"model.base={tiny_model_dir}", "data.max_seq_len=128", "train.micro_batch_size=2", "train.epochs=1"]
    plans = {}
    for n in (1, 2):
        out = tmp_path / f"plan{n}.json"
        assert plan_main([*args, "--budget-gb", "8", "--nproc", str(n), "--json", str(out)]) == 0
        plans[n] = (json.loads(out.read_text()), capsys.readouterr().out)
    (one, _), (two, text) = plans[1], plans[2]
    assert seen_threads == [max(1, (os.cpu_count() or 1) // n) for n in (1, 2)]
    assert seen_others == [0, 1] and not multiprocessing.active_children()  # and it is gone after
    assert torch.get_num_threads() == threads_before  # the calibration's thread count is put back
    assert (one["processes"], two["processes"]) == (1, 2) and two["threads"] == seen_threads[1]
    assert two["budget_bytes"] == one["budget_bytes"] == 8 * GB
    assert two["tokens_per_step"] == pytest.approx(2 * one["tokens_per_step"])
    assert two["total_steps"] == -(-one["total_steps"] // 2) and one["total_steps"] >= 2
    assert two["tokens_per_s"] == pytest.approx(two["tokens_per_step"] / two["step_s"])
    assert "per process" in text and "2 processes" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("to run it"))
    words = shlex.split(line.split("to run it", 1)[1])
    assert words[:4] == ["qlorakit", "train", "--nproc", "2"]
    run = load_recipe(None, words[4:])
    assert run.train.memory_budget_gb * GB == pytest.approx(8 * GB)  # the machine's budget; train halves it
    # half the budget for each process: a budget that fits one process's plan does not fit two
    monkeypatch.setattr(plan_mod, "_baseline_bytes", lambda: 0.3 * GB)  # the same process baseline each time
    recipe = load_recipe(None, [*args, "train.gradient_checkpointing=off"])
    need = plan_mod.plan_recipe(recipe, budget_bytes=64 * GB, calibrate_time=False).peak_bytes
    fit_one, fit_two = (plan_mod.plan_recipe(recipe, budget_bytes=need * 1.01, calibrate_time=False, processes=n)
                        for n in (1, 2))
    assert fit_one.fits and not fit_two.fits and fit_two.peak_bytes > need * 1.01 / 2
    assert plan_main([*args, "--nproc", "0", "--no-calibrate"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("precision,nproc", [("bf16", 1), ("fp32", 1), ("bf16", 2)])
def test_a_run_chooses_what_its_plan_showed(tiny_model_dir, monkeypatch, precision, nproc):
    """`qlorakit train` takes checkpointing and the base weights' form from the same candidates and
    the same estimate as `qlorakit plan`, at every budget from roomy to too small, in either
    precision of the fast path, and in each process of a data parallel run (`plan --nproc 2`,
    `train --nproc 2`: the processes share the budget)."""
    from transformers import AutoConfig

    from qlorakit.train import memory

    # the tiny model's evaluation after training (a fixed overhead) would outweigh every training
    # candidate; without it the candidates' own peaks decide, as they do for real models
    monkeypatch.setattr(memory, "EVAL_OVERHEAD", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(nproc))  # what torchrun tells each training process

    from qlorakit.config import load_recipe
    from qlorakit.models import load_base_model
    from qlorakit.train.plan import _file_bytes, choose_memory_settings, model_precision

    shape = ModelShape.from_config(AutoConfig.from_pretrained(str(tiny_model_dir)))
    dtype_override = f"model.compute_dtype={precision}"
    model = load_base_model(load_recipe(None, [f"model.base={tiny_model_dir}", dtype_override]).model).model
    assert model_precision(model) == precision
    base, seq, mb = 300e6, 96, 4
    common = dict(model_name="tiny", micro_batch=mb, seq_len=seq, grad_accum=1, r=16, alpha=32, dropout=0.0,
                  sample=None, total_steps=50, calibrate_time=False, file_bytes=_file_bytes(tiny_model_dir),
                  baseline=base, precision=precision, processes=nproc)
    from qlorakit.train.plan import _memory

    # budgets at and just under each candidate's predicted peak at the recipe's micro-batch
    peaks = [_memory(shape, c, 16, base, common["file_bytes"]).peak
             for c in _candidates(mb, seq, 1, "auto", False, precision)[:4]]
    assert len(set(peaks)) == 4
    seen = set()
    for budget in sorted({nproc * x * f for x in peaks for f in (1.0, 0.999)}):
        p = plan_run(shape, budget_bytes=budget, **common)
        assert p.fits == (p.peak_bytes <= budget / nproc)
        if p.settings.micro_batch != mb:
            continue  # the run keeps the recipe's micro-batch; the plan's command sets the smaller one
        recipe = load_recipe(None, [f"model.base={tiny_model_dir}", f"data.max_seq_len={seq}", "train.max_steps=50",
                                    dtype_override, *p.train_overrides()])
        recipe.train.gradient_checkpointing = "auto"  # the run's own choice, not the plan's written down
        recipe.train.memory_budget_gb = budget / GB
        got = choose_memory_settings(recipe, model, seq_len=seq, baseline=base, folder=tiny_model_dir, total_steps=50)
        assert (got.checkpointing, got.weights) == (p.settings.checkpointing, p.settings.weights), budget
        assert got.fits == p.fits and abs(got.estimate.peak - p.peak_bytes) <= 1e-6 * p.peak_bytes
        seen.add((got.checkpointing, got.weights))
    # several candidates were chosen (one that needs more than a later one is never the first to fit)
    assert len(seen) >= 2, seen


_RSS_FILE_SCRIPT = r"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers, peft, bitsandbytes
def rss_file():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
from qlorakit.config import load_recipe
from qlorakit.models import load_base_model
warm = load_base_model(load_recipe(None, [f"model.base={sys.argv[2]}"]).model)  # maps the libraries loading uses
before = rss_file()
second = load_base_model(load_recipe(None, [f"model.base={sys.argv[1]}"]).model)
mapped = [line for line in open("/proc/self/maps") if os.path.realpath(sys.argv[1]) in line]
print(json.dumps({"file_pages": rss_file() - before, "mapped": mapped}))
"""


def test_loader_keeps_no_page_of_the_weight_files(tiny_model_dir, tmp_path):
    """What the memory model assumes: safetensors files are read tensor by tensor, so none of their
    pages is resident once the model is loaded, from fp32 files (whose embeddings and norms would
    otherwise stay views of a mapping of the whole file, for the whole run) and from bf16 files."""
    import shutil
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from qlorakit.train.plan import _file_bytes

    fp32 = tmp_path / "fp32"
    shutil.copytree(tiny_model_dir, fp32)
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).save_pretrained(str(bf16))
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, bf16 / f.name)
    warm = tmp_path / "warm"  # another copy: its load maps the libraries, not the measured files
    shutil.copytree(tiny_model_dir, warm)
    for folder in (fp32, bf16):
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", _RSS_FILE_SCRIPT, str(folder), str(warm)], capture_output=True,
                             text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        # mapped whole, the fp32 file stays mapped (its norms are views of it) and partly resident
        assert res["mapped"] == [], (folder.name, res["mapped"])
        assert res["file_pages"] <= 0.02 * size, (folder.name, res["file_pages"], size)
        assert _file_bytes(folder) == 0  # nothing read whole
    est = estimate_memory(SHAPE_135M, micro_batch=1, seq_len=128, r=8)
    assert est.parts["embeddings, norms, head (fp32)"] == SHAPE_135M.other_params * 4
    assert not any("file" in k for k in est.parts)


def test_loader_reads_the_same_weights_as_transformers_mapping_the_file(tiny_model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlorakit.config import load_recipe
    from qlorakit.models import load_base_model

    ours = load_base_model(load_recipe(None, [f"model.base={tiny_model_dir}"]).model).model.state_dict()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, quantization_config=bnb,
                                               device_map={"": "cpu"}).state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_calibration_takes_a_micro_batch_of_typical_attention_work():
    from qlorakit.train.plan import _segment_work, _trim

    # six packed rows of 12 tokens: one segment of 12 (work 144), two of 6 (72), three of 4 (48)
    layouts = [[12], [6, 6], [4, 4, 4], [12], [6, 6], [4, 4, 4]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in lay]) for lay in layouts])
    ids = torch.arange(6)[:, None].repeat(1, 12)  # row i holds token i
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}
    assert [_segment_work(p) for p in pos] == [144, 72, 48, 144, 72, 48]
    out = _trim(batch, 2, 12)
    # the mean work is 88: the two rows of 72 are closest; the first two rows (144, 72) are not
    assert sorted(out["input_ids"][:, 0].tolist()) == [1, 4]
    assert out["position_ids"].shape == (2, 12)
    # a sample of one micro-batch is taken as it is
    one = _trim({k: v[:2] for k, v in batch.items()}, 2, 12)
    assert one["input_ids"][:, 0].tolist() == [0, 1]


def test_calibration_timing_leaves_out_the_two_slow_first_calls():
    # a fresh model's first call compiles and its second is still slow (as a run's second step is):
    # the median the planner predicts from must come from the calls after them
    from qlorakit.train.plan import _time

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.08 if len(calls) <= 2 else 0.002)

    first, median = _time(fn, repeats=3)
    assert len(calls) == 5
    assert first >= 0.08 and median < 0.04


class _SpellClock:
    """A fake clock for timing tests: every call costs its work, times ``factor`` for the calls
    numbered in ``slow`` (a slow spell of the shared machine)."""

    def __init__(self, slow: range, factor: float):
        self.now, self.calls, self.slow, self.factor = 0.0, 0, slow, factor

    def perf_counter(self) -> float:
        return self.now

    def work(self, seconds: float):
        def fn():
            self.now += seconds * (self.factor if self.calls in self.slow else 1.0)
            self.calls += 1
        return fn


def test_extrapolated_layer_time_pairs_the_two_depths_against_a_slow_spell(monkeypatch):
    # 1 layer costs 1 s, 6 layers 6 s: 1 s per extra layer, no fixed part. A spell 30% slower
    # falls on the deeper model's timing: timed one model after the other, the difference takes
    # the spell on one side only (1.36 s per layer, and the prediction multiplies it by the depth);
    # timed in turn, the spell spoils two of the five pairs and the median of the differences
    # is the machine's usual speed.
    from qlorakit.train import plan

    clock = _SpellClock(range(5, 10), 1.3)
    monkeypatch.setattr(plan, "time", clock)
    few, more = clock.work(1.0), clock.work(6.0)
    _, per_few = plan._time(few, 3)  # calls 0-4
    _, per_more = plan._time(more, 3)  # calls 5-9, in the spell
    assert (per_more - per_few) / 5 == pytest.approx(1.36)

    clock = _SpellClock(range(8, 12), 1.3)  # the spell over the first two pairs
    monkeypatch.setattr(plan, "time", clock)
    few, more = clock.work(1.0), clock.work(6.0)
    plan._time(few, 3)  # the 1-layer model is timed (and warm) first, as calibrate does: calls 0-4
    first, layer_s, per_few, per_more = plan._paired_layer_time(few, more, 5, 5)
    assert clock.calls == 5 + 2 + 2 * 5  # two warmup calls of the deeper model, then five pairs
    assert layer_s == pytest.approx(1.0)
    assert (per_few, per_more) == (pytest.approx(1.0), pytest.approx(6.0))
    assert first == pytest.approx(6.0)


def test_the_evaluation_after_training_counts_in_the_peak():
    """`qlorakit train` evaluates in the same process after training: the predicted peak is the
    highest of loading, training and that evaluation, and a budget below the evaluation's need
    does not fit even where the training would."""
    from qlorakit.train import memory

    shape = SHAPE_135M
    small = estimate_memory(shape, micro_batch=1, seq_len=128, r=16, checkpointing=True, weights="per-use",
                            baseline=525 * 2**20)
    assert small.eval_peak > small.train_peak and small.peak == small.eval_peak
    # the model, the decoder's copies and the overhead, above the process
    need = small.eval_peak - 525 * 2**20
    assert need >= memory.EVAL_OVERHEAD + 2 * shape.linear_params * memory.NF4_BYTES_PER_PARAM
    big = estimate_memory(shape, micro_batch=4, seq_len=512, r=16, baseline=525 * 2**20)
    assert big.peak == big.train_peak > big.eval_peak
    p = plan_run(shape, model_name="m", micro_batch=1, seq_len=128, grad_accum=1, r=16, alpha=32, dropout=0.0,
                 sample=None, total_steps=10, calibrate_time=False, baseline=525 * 2**20,
                 budget_bytes=0.5 * (small.train_peak + small.eval_peak))
    assert not p.fits and p.eval_peak_bytes == p.peak_bytes


def test_the_budget_a_plan_prints_is_one_train_accepts_and_never_above_the_plan(monkeypatch):
    from qlorakit.config import load_recipe
    from qlorakit.train.plan import GB, _budget_text

    for budget_gb in (0.0005, 0.0123456, 1.4, 6.0, 12345.6789):
        text = _budget_text(budget_gb * GB)
        recipe = load_recipe(None, [f"train.memory_budget_gb={text}"])  # refused if 0 or not a number
        assert 0 < recipe.train.memory_budget_gb <= budget_gb
        assert budget_gb - recipe.train.memory_budget_gb < 1e-6
    assert _budget_text(6 * GB) == "6" and _budget_text(12345.6789 * GB) == "12345.6789"
