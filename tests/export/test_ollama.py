"""The Ollama export: a Modelfile whose TEMPLATE/SYSTEM render conversations as the training chat template does."""

from __future__ import annotations

import json

import pytest

from qlorakit.export import ExportError, modelfile_text, ollama_chat_for, parse_modelfile, render_go_template
from qlorakit.export.ollama import probe_conversations, render_ollama


@pytest.fixture(scope="module")
def tok():
    from qlorakit.models import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base("default")[0])


def test_go_template_subset():
    data = {"System": "sys", "Messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert render_go_template("{{ .System }}|{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}", data) \
        == "sys|[user:a][assistant:b]"
    # trim markers remove the whitespace on their side only, as Go does
    assert render_go_template("x \n {{- .System -}} \n y", data) == "xsysy"
    assert render_go_template("{{ if .System }}S{{ else }}N{{ end }}{{ if .Missing }}S{{ else }}N{{ end }}", data) == "SN"
    with pytest.raises(ExportError, match="unsupported expression"):
        render_go_template("{{ index .Messages 0 }}", data)
    with pytest.raises(ExportError, match="missing"):
        render_go_template("{{ range .Messages }}x", data)


def test_chatml_template_renders_like_training(tok):
    chat = ollama_chat_for(tok)
    assert chat.family == "chatml" and chat.stop == ["<|im_end|>"]
    assert chat.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = modelfile_text(chat, "model.gguf", num_ctx=4096, source="run")
    parsed = parse_modelfile(text)
    conv = [{"role": "user", "content": "Where is my order?"}]
    # a known string: the default system prompt goes first, then the turn, then the answer header
    assert render_ollama(parsed["template"], parsed["system"], conv) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhere is my order?<|im_end|>\n<|im_start|>assistant\n")
    for c in probe_conversations():
        want = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        assert render_ollama(parsed["template"], parsed["system"], c) == want
    assert parsed["from"] == "./model.gguf"
    assert parsed["parameters"]["stop"] == ["<|im_end|>"]
    assert parsed["parameters"]["temperature"] == ["0"] and parsed["parameters"]["repeat_penalty"] == ["1"]


def test_template_that_is_not_chatml_is_refused(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    with pytest.raises(ExportError, match="renders differently from ChatML"):
        ollama_chat_for(t)


def test_ollama_export_passes(run_copy, tmp_path):
    from qlorakit.export import export_run

    out = tmp_path / "ollama"
    res = export_run(run_copy, "ollama", out, quant="f16", runtime="transformers", measure=False)
    assert res.passed, res.reasons
    assert {p.name for p in out.iterdir()} >= {"model.gguf", "Modelfile"}
    terms = json.loads((run_copy / "adapter" / "adapter_config.json").read_text())["qlorakit"]
    licence = parse_modelfile((out / "Modelfile").read_text())["license"]
    assert licence.startswith(terms["adapter_licence"]) and terms["data_terms"] in licence
    (rep,) = res.reports
    assert rep.template_ok and rep.tokenizer_ok and rep.token_agreement >= 0.95
