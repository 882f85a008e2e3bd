"""Writing each export format, and opening what was written as the parity check runs it.

Each format has a writer (source -> files in a folder) and an opener (folder -> the runners that
replay golden prompts through the artifact, plus problems found by static checks: non-finite
weights, a Modelfile whose template differs from training's).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._gguf import shared_gguf_readers
from ..lora import PEFT_PREFIX
from .common import ExportError, LOSSY_GGUF_QUANTS, write_atomic
from .gguf_file import (
    gguf_tensors_finite,
    llama_tensor_name,
    read_gguf,
    unpermute_qk,
    write_lora_gguf,
    write_model_gguf,
)
from .ollama import modelfile_text, ollama_chat_for, parse_modelfile, probe_conversations, render_ollama
from .parity import HFRunner, LlamaCppRunner, Runner, llama_cpp_available
from .source import (
    Source,
    build_model,
    check_finite,
    end_of_turn_ids,
    full_precision_state,
    merged_model,
    plain_config,
    plain_config_of,
)

__all__ = [
    "Opened",
    "write_merged",
    "write_peft",
    "write_gguf",
    "write_ollama",
    "open_artifacts",
    "gguf_names",
]

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Opened:
    """The runners of one export and the problems its static checks found."""
    runners: list[tuple[str, Runner]] = field(default_factory=list)  # (artifact description, runner)
    problems: list[str] = field(default_factory=list)
    lossy: bool = False
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ merged


def write_merged(source: Source, out: Path, dtype: str) -> dict[str, Any]:
    """The adapter merged into the dequantized base in fp32, saved as a Hugging Face folder."""
    model = merged_model(source)  # fp32, finite-checked
    tok = source.loaded.tokenizer
    stops = end_of_turn_ids(tok)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tok.pad_token_id
    if dtype == "nf4":
        return _write_nf4(source, model, out)
    model.to(_TORCH_DTYPES[dtype])
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _write_terms_readme(source, out, f"The LoRA adapter of run {source.run_dir.name} merged into "
                                     f"{source.loaded.name} ({dtype} weights, a transformers folder).")
    return {"dtype": dtype}


def data_terms(source: Source) -> dict[str, str]:
    """The run's data terms (licences, commercial use, share-alike, credit), as its adapter carries them."""
    terms = source.adapter_config.get("qlorakit")
    return {str(k): str(v) for k, v in terms.items()} if isinstance(terms, dict) else {}


def _terms_section(terms: dict[str, str]) -> list[str]:
    """README lines that carry the data terms into an export, as the model card does for the run."""
    if not terms:
        return []
    return [f"**Licence:** {terms.get('adapter_licence', 'see below')}. "
            f"**Commercial use:** {'allowed' if terms.get('data_commercial_use') == 'true' else 'not allowed'}.",
            "", terms.get("data_terms", ""), "", "## Data terms", "", "```json", json.dumps(terms, indent=2), "```", ""]


def _write_terms_readme(source: Source, out: Path, what: str) -> None:
    """The README of a merged export: what it is, and the data terms."""
    lines = [f"# {source.run_dir.name}", "", what, ""] + _terms_section(data_terms(source))
    write_atomic(out / "README.md", "\n".join(lines))


def _write_nf4(source: Source, model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """Merged weights quantized again to 4-bit NF4 (bitsandbytes): lossy; the parity check measures how much."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..quant import guard_linear4bit

    tmp = out / ".merged-fp32"
    model.save_pretrained(str(tmp))
    mc = source.recipe.model
    q = AutoModelForCausalLM.from_pretrained(
        str(tmp), dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mc.quant_type,
                                               bnb_4bit_use_double_quant=mc.double_quant,
                                               bnb_4bit_compute_dtype=source.loaded.compute_dtype,
                                               bnb_4bit_quant_storage=torch.uint8))
    guard_linear4bit(q)
    q.generation_config = model.generation_config
    q.save_pretrained(str(out))
    source.loaded.tokenizer.save_pretrained(str(out))
    shutil.rmtree(tmp)
    _write_terms_readme(source, out, f"The LoRA adapter of run {source.run_dir.name} merged into "
                                     f"{source.loaded.name}, quantized again to 4-bit NF4 (bitsandbytes).")
    return {"dtype": "nf4"}


def _open_merged(out: Path, info: dict[str, Any], source: Source) -> Opened:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ..quant import guard_linear4bit

    opened = Opened(lossy=info.get("dtype") == "nf4")
    weights = sorted(out.glob("*.safetensors"))
    if not weights:
        opened.problems.append(f"{out}: no .safetensors weights")
        return opened
    for w in weights:
        state = load_file(str(w))
        try:
            check_finite(state, w.name)
        except ExportError as e:
            opened.problems.append(str(e))
    if opened.problems:
        return opened
    try:
        tok = AutoTokenizer.from_pretrained(str(out))
        gen = GenerationConfig.from_pretrained(str(out))
        if info.get("dtype") == "nf4":
            q = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": "cpu"})
            guard_linear4bit(q)
            # the 4-bit weights dequantized exactly: the values the 4-bit layers compute with, run in fp32
            model = build_model(plain_config_of(q), full_precision_state(q, merge=False))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        opened.problems.append(f"{out}: transformers could not load the merged model: {e}")
        return opened
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    stop = [int(i) for i in eos if i is not None]
    runtime = "transformers " + ("(NF4 weights, dequantized, fp32)" if info.get("dtype") == "nf4" else "fp32")
    opened.runners.append((f"merged ({info.get('dtype')})",
                           HFRunner(runtime, model, stop=stop, tokenizer=tok, template=tok.chat_template or "",
                                    pad_id=tok.pad_token_id or 0)))
    return opened


# -------------------------------------------------------------------------------------------------- peft


def write_peft(source: Source, out: Path) -> dict[str, Any]:
    """The adapter folder as peft and vLLM load it (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import load_file

    src = source.adapter_dir
    check_finite(load_file(str(src / "adapter_model.safetensors")), "adapter_model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "adapter_model.safetensors", out / "adapter_model.safetensors")
    conf = source.adapter_config
    # peft warns on keys it does not know: the run's own metadata (licence terms) stays in the safetensors
    # header and in the README
    clean = {k: v for k, v in conf.items() if k != "qlorakit"}
    write_atomic(out / "adapter_config.json", json.dumps(clean, indent=2) + "\n")
    mc = source.recipe.model
    folder = str(Path(source.loaded.folder).resolve())
    readme = "\n".join([
        f"# LoRA adapter: {source.run_dir.name}",
        "",
        f"A LoRA adapter (rank {conf['r']}, alpha {conf['lora_alpha']}) for **{source.loaded.name}**, "
        f"trained by qlorakit on the base's 4-bit {mc.quant_type.upper()} weights (double quantization "
        f"{'on' if mc.double_quant else 'off'}). The base as a transformers folder is `{folder}` on the machine "
        "that trained it (`qlorakit.models.resolve_base` makes it from the base's name or GGUF file).",
        "",
        "The tuned model is the adapter over that base quantized the same way; these lines reproduce it "
        "(answers of `qlorakit generate`):",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, BitsAndBytesConfig",
        "from peft import PeftModel",
        f"bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={mc.quant_type!r}, "
        f"bnb_4bit_use_double_quant={bool(mc.double_quant)}, bnb_4bit_compute_dtype=torch.bfloat16)",
        f"base = AutoModelForCausalLM.from_pretrained({folder!r}, quantization_config=bnb)",
        "model = PeftModel.from_pretrained(base, THIS_FOLDER)",
        "```",
        "",
        "Over the base in full precision (no `quantization_config`) the adapter works too, but its answers "
        "differ a little: the adapter learnt to correct the 4-bit weights, not the original ones.",
        "",
        f"vLLM: `vllm serve {folder} --enable-lora --lora-modules NAME=THIS_FOLDER "
        f"--max-lora-rank {max(8, int(conf['r']))}` (a full-precision base, as above).",
        "",
        "Use the base model's tokenizer and chat template: the adapter was trained with them.",
        "",
    ] + _terms_section(data_terms(source)))
    write_atomic(out / "README.md", readme)
    return {"rank": conf["r"], "alpha": conf["lora_alpha"], "targets": conf.get("target_modules")}


def _open_peft(out: Path, info: dict[str, Any], source: Source) -> Opened:
    from peft import PeftModel
    from safetensors.torch import load_file

    opened = Opened()
    try:
        check_finite(load_file(str(out / "adapter_model.safetensors")), "adapter_model.safetensors")
    except (ExportError, OSError) as e:
        opened.problems.append(str(e))
        return opened
    # peft over the base the adapter was trained on: the NF4 weights dequantized exactly, in fp32
    base = build_model(plain_config(source.loaded), full_precision_state(source.loaded.model, merge=False))
    try:
        model = PeftModel.from_pretrained(base, str(out))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        opened.problems.append(f"{out}: peft could not load the adapter: {e}")
        return opened
    tok = source.loaded.tokenizer
    opened.runners.append(("peft adapter over the base",
                           HFRunner("peft over the NF4 base (dequantized), fp32", model, stop=end_of_turn_ids(tok),
                                    pad_id=tok.pad_token_id or 0)))
    return opened


# -------------------------------------------------------------------------------------------------- gguf


def gguf_names(quant: str) -> dict[str, str]:
    return {"model": f"model-{quant}.gguf", "base": f"base-{quant}.gguf", "adapter": "adapter-lora.gguf"}


def _lora_pairs(source: Source) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    state = load_file(str(source.adapter_dir / "adapter_model.safetensors"))
    norm = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for k, v in state.items()}
    pairs = {}
    for k, a in norm.items():
        if ".lora_A." not in k:
            continue
        module = k.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
        b = norm.get(k.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ExportError(f"{source.adapter_dir}: {k} has no matching lora_B")
        pairs[module] = (a, b)
    return pairs


def write_gguf(source: Source, out: Path, quant: str, *, with_base: bool = True) -> dict[str, Any]:
    """The merged model as GGUF, the adapter alone as a GGUF LoRA, and the base it applies to."""
    names = gguf_names(quant)
    tok = source.loaded.tokenizer
    config = plain_config(source.loaded)
    eot = [i for i in end_of_turn_ids(tok) if i != tok.eos_token_id]
    kw = {"chat_template": tok.chat_template, "eot_id": eot[0] if eot else None}
    out.mkdir(parents=True, exist_ok=True)
    merged = full_precision_state(source.loaded.model, merge=True)
    check_finite(merged, "merged weights")
    info: dict[str, Any] = {"quant": quant, "files": names}
    terms = data_terms(source)
    info["model"] = write_model_gguf(out / names["model"], merged, config, tok, quant,
                                     name=f"{source.run_dir.name} (merged)", terms=terms, **kw)
    del merged
    if with_base:
        base = full_precision_state(source.loaded.model, merge=False)
        info["base"] = write_model_gguf(out / names["base"], base, config, tok, quant,
                                        name=f"{source.loaded.name} (dequantized NF4 base)", **kw)
        del base
    conf = source.adapter_config
    info["adapter"] = write_lora_gguf(out / names["adapter"], _lora_pairs(source), config,
                                      float(conf["lora_alpha"]), name=f"{source.run_dir.name} (LoRA)", terms=terms)
    return info


def _gguf_runtime(out: Path, model: str, lora: str | None, runtime: str, n_ctx: int) -> Runner:
    if runtime == "llama.cpp":
        return LlamaCppRunner("llama.cpp", str(out / model), lora_path=str(out / lora) if lora else None,
                              n_ctx=n_ctx)
    return _torch_gguf_runner(out / model, out / lora if lora else None)


def _torch_gguf_runner(model_path: Path, lora_path: Path | None) -> Runner:
    """A GGUF read back by transformers (dequantized to fp32), with a GGUF LoRA applied by qlorakit.lora."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                     dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ExportError(f"{model_path}: transformers could not read the GGUF file: {e}") from e
    meta = read_gguf(model_path)["meta"]
    stop = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    if lora_path is not None:
        _apply_gguf_lora(model, lora_path)
    return HFRunner("transformers reading the GGUF (fp32)", model, stop=stop, tokenizer=tok,
                    template=meta.get("tokenizer.chat_template"), pad_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)))


def _hf_module_names(n_layers: int) -> dict[str, str]:
    """llama.cpp tensor name -> Hugging Face module name, for the adapter's targets."""
    out = {}
    for i in range(n_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            hf = f"model.layers.{i}.{part}"
            out[llama_tensor_name(hf + ".weight")] = hf
    return out


def _apply_gguf_lora(model: torch.nn.Module, lora_path: Path) -> None:
    import gguf

    from ..config import LoraConfig
    from ..lora import attach_lora, lora_layers

    r = gguf.GGUFReader(str(lora_path))
    meta = read_gguf(lora_path)["meta"]
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise ExportError(f"{lora_path}: not a GGUF LoRA adapter (general.type={meta.get('general.type')!r}, "
                          f"adapter.type={meta.get('adapter.type')!r})")
    alpha = float(meta["adapter.lora.alpha"])
    names = _hf_module_names(model.config.num_hidden_layers)
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in r.tensors}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        base, _, ab = name.rpartition(".")
        if base not in names or ab not in ("lora_a", "lora_b"):
            raise ExportError(f"{lora_path}: unexpected tensor {name!r}")
        pairs.setdefault(names[base], {})[ab] = t
    heads = {"q_proj": model.config.num_attention_heads,
             "k_proj": model.config.num_key_value_heads or model.config.num_attention_heads}
    ranks = {p["lora_a"].shape[0] for p in pairs.values()}
    if len(ranks) != 1:
        raise ExportError(f"{lora_path}: adapter pairs have different ranks {sorted(ranks)}")
    attach_lora(model, LoraConfig(r=ranks.pop(), alpha=alpha, targets=sorted(pairs)))
    with torch.no_grad():
        for name, m in lora_layers(model):
            a, b = pairs[name]["lora_a"], pairs[name]["lora_b"]
            leaf = name.rsplit(".", 1)[-1]
            if leaf in heads:
                b = torch.from_numpy(unpermute_qk(b.numpy(), int(heads[leaf])).copy())
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)


def _gguf_static_problems(out: Path, files: list[str]) -> list[str]:
    problems = []
    for f in files:
        p = out / f
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        try:
            bad = gguf_tensors_finite(p)
        except (ValueError, OSError) as e:
            problems.append(f"{p}: not a readable GGUF file ({e})")
            continue
        if bad:
            problems.append(f"{p.name}: {len(bad)} tensor(s) hold NaN or infinite values: {', '.join(bad[:5])}")
    return problems


def _pick_runtime(runtime: str) -> str:
    if runtime == "auto":
        return "llama.cpp" if llama_cpp_available() else "transformers"
    if runtime == "llama.cpp" and not llama_cpp_available():
        raise ExportError("--runtime llama.cpp needs llama-cpp-python: "
                          "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'qlorakit[gguf-check]'")
    return runtime


def _not_llama_cpp_note(runtime: str) -> str:
    why = "--runtime transformers was asked for" if runtime == "transformers" else "llama-cpp-python is not installed"
    return (f"{why}: the GGUF files were read back by transformers (tensors, tokenizer, chat template), "
            "not run in llama.cpp")


def _n_ctx(source: Source) -> int:
    return max(512, source.recipe.data.max_seq_len + source.recipe.export.max_new_tokens + 64)


def _open_gguf(out: Path, info: dict[str, Any], source: Source, runtime: str) -> Opened:
    names = info["files"]
    files = [names["model"]] + ([names["base"], names["adapter"]] if "base" in info else [names["adapter"]])
    opened = Opened(lossy=info["quant"] in LOSSY_GGUF_QUANTS)
    opened.problems += _gguf_static_problems(out, files)
    if opened.problems:
        return opened
    rt = _pick_runtime(runtime)
    if rt != "llama.cpp":
        opened.notes.append(_not_llama_cpp_note(runtime))
    n_ctx = _n_ctx(source)
    _add_runner(opened, f"GGUF {info['quant']} (merged)", out, names["model"], None, rt, n_ctx)
    if "base" in info:
        _add_runner(opened, f"GGUF {info['quant']} base + GGUF LoRA adapter", out, names["base"], names["adapter"],
                    rt, n_ctx)
    return opened


def _add_runner(opened: Opened, artifact: str, out: Path, model: str, lora: str | None, runtime: str,
                n_ctx: int) -> None:
    """A runtime that cannot load the file is a failed check, with the runtime's reason."""
    try:
        opened.runners.append((artifact, _gguf_runtime(out, model, lora, runtime, n_ctx)))
    except ExportError as e:
        opened.problems.append(f"{artifact}: {e}")


# ------------------------------------------------------------------------------------------------ ollama


def write_ollama(source: Source, out: Path, quant: str) -> dict[str, Any]:
    """model.gguf and a Modelfile whose TEMPLATE, SYSTEM and stop tokens match training."""
    tok = source.loaded.tokenizer
    chat = ollama_chat_for(tok)  # raises when the template cannot be translated faithfully
    config = plain_config(source.loaded)
    eot = [i for i in end_of_turn_ids(tok) if i != tok.eos_token_id]
    out.mkdir(parents=True, exist_ok=True)
    merged = full_precision_state(source.loaded.model, merge=True)
    check_finite(merged, "merged weights")
    terms = data_terms(source)
    model_info = write_model_gguf(out / "model.gguf", merged, config, tok, quant,
                                  name=f"{source.run_dir.name} (merged)", chat_template=tok.chat_template,
                                  eot_id=eot[0] if eot else None, terms=terms)
    num_ctx = min(int(config.max_position_embeddings), 4096)
    licence = (f"{terms.get('adapter_licence', '')}\n{terms.get('data_terms', '')}".strip() if terms else None)
    write_atomic(out / "Modelfile", modelfile_text(chat, "model.gguf", num_ctx=num_ctx, source=source.run_dir.name,
                                                   licence=licence))
    return {"quant": quant, "model": model_info, "family": chat.family, "system": chat.system, "stop": chat.stop,
            "num_ctx": num_ctx}


def _modelfile_problems(out: Path, source: Source, conversations: list[list[dict[str, str]]]) -> list[str]:
    from .parity import _training_end_of_turn

    mf = out / "Modelfile"
    if not mf.is_file():
        return [f"{mf}: missing"]
    try:
        parsed = parse_modelfile(mf.read_text(encoding="utf-8"))
    except ExportError as e:
        return [f"{mf}: {e}"]
    problems = []
    if parsed["from"] != "./model.gguf":
        problems.append(f"Modelfile: FROM is {parsed['from']!r}, expected './model.gguf'")
    if not parsed["template"]:
        return problems + ["Modelfile: no TEMPLATE; Ollama would fall back to a template that differs from training"]
    tok = source.loaded.tokenizer
    for conv in conversations + probe_conversations():
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        try:
            got = render_ollama(parsed["template"], parsed["system"], conv)
        except ExportError as e:
            problems.append(f"Modelfile TEMPLATE: {e}")
            break
        if got != want:
            i = next((k for k, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
            problems.append(f"Modelfile TEMPLATE/SYSTEM: renders a conversation differently from the training chat "
                            f"template (first difference at character {i}: training {want[i:i + 40]!r}, "
                            f"Modelfile {got[i:i + 40]!r})")
            break
    eot = tok.convert_ids_to_tokens(_training_end_of_turn(tok))
    stops = parsed["parameters"].get("stop", [])
    if eot not in stops:
        problems.append(f"Modelfile: PARAMETER stop does not include {eot!r}, the token training ends answers with "
                        f"(stops: {stops})")
    return problems


def _open_ollama(out: Path, info: dict[str, Any], source: Source, runtime: str,
                 conversations: list[list[dict[str, str]]]) -> Opened:
    opened = Opened(lossy=info["quant"] in LOSSY_GGUF_QUANTS)
    opened.problems += _modelfile_problems(out, source, conversations)
    opened.problems += _gguf_static_problems(out, ["model.gguf"])
    if any("model.gguf" in p for p in opened.problems):
        return opened
    rt = _pick_runtime(runtime)
    if rt != "llama.cpp":
        opened.notes.append(_not_llama_cpp_note(runtime))
    _add_runner(opened, f"Ollama model.gguf ({info['quant']})", out, "model.gguf", None, rt, _n_ctx(source))
    return opened


def open_artifacts(fmt: str, out: Path, info: dict[str, Any], source: Source, *, runtime: str = "auto",
                   conversations: list[list[dict[str, str]]] | None = None) -> Opened:
    # each GGUF file is parsed once, though its checks and transformers open it up to five times
    with shared_gguf_readers():
        return _open_artifacts(fmt, out, info, source, runtime, conversations)


def _open_artifacts(fmt: str, out: Path, info: dict[str, Any], source: Source, runtime: str,
                    conversations: list[list[dict[str, str]]] | None) -> Opened:
    if fmt == "merged":
        return _open_merged(out, info, source)
    if fmt == "peft":
        return _open_peft(out, info, source)
    if fmt == "gguf":
        return _open_gguf(out, info, source, runtime)
    if fmt == "ollama":
        return _open_ollama(out, info, source, runtime, conversations or [])
    raise ExportError(f"unknown format {fmt!r}")
