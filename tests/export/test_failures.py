"""Broken exports are caught by the parity check and the command exits non-zero with the reason."""

from __future__ import annotations

import json
import shutil

import pytest

from qlorakit.cli import main
from qlorakit.export import REPORT_NAME, export_run


@pytest.fixture(scope="module")
def good_merged(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    run = root / "run"
    shutil.copytree(tiny_run, run)
    out = root / "merged"
    res = export_run(run, "merged", out, dtype="fp32", measure=False)
    assert res.passed, res.reasons
    return run, out


def _copy(src, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(src, dst)
    return dst


def _check(out, capsys):
    rc = main(["export", "--check", str(out)])
    return rc, capsys.readouterr()


def test_check_passes_on_an_untouched_export(good_merged, tmp_path, capsys):
    out = _copy(good_merged[1], tmp_path)
    rc, cap = _check(out, capsys)
    assert rc == 0, cap.err
    checks = json.loads((out / REPORT_NAME).read_text())["checks"]
    assert checks[-1]["status"] == "passed"


def test_planted_wrong_chat_template_is_caught(good_merged, tmp_path, capsys):
    out = _copy(good_merged[1], tmp_path)
    tpl = out / "chat_template.jinja"
    tpl.write_text(tpl.read_text().replace("<|im_start|>assistant\n", "<|im_start|>assistant "))
    rc, cap = _check(out, capsys)
    assert rc == 1
    assert "chat template" in cap.err and "first difference" in cap.err


def _tamper_tensor(out, how):
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    state = load_file(str(path))
    name = "model.layers.0.mlp.down_proj.weight"
    if how == "nan":
        state[name][0, 0] = float("nan")
    else:
        state[name] = state[name] * 100
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return name


def test_planted_nan_is_caught(good_merged, tmp_path, capsys):
    out = _copy(good_merged[1], tmp_path)
    name = _tamper_tensor(out, "nan")
    rc, cap = _check(out, capsys)
    assert rc == 1
    assert "NaN or infinite" in cap.err and name in cap.err


def test_planted_scaled_tensor_is_caught(good_merged, tmp_path, capsys):
    out = _copy(good_merged[1], tmp_path)
    _tamper_tensor(out, "scale")
    rc, cap = _check(out, capsys)
    assert rc == 1
    assert "token agreement" in cap.err or "held-out loss rose" in cap.err


def test_planted_template_during_export_fails_the_export(run_copy, tmp_path, monkeypatch, capsys):
    """A GGUF writer that writes the wrong chat template: the export command exits 1, OUT is not created,
    the failed export is kept in OUT.failed with the reasons."""
    import qlorakit.export.artifacts as artifacts

    real = artifacts.write_model_gguf

    def wrong_template(*a, chat_template=None, **kw):
        return real(*a, chat_template=chat_template.replace("<|im_end|>", "</s>"), **kw)

    monkeypatch.setattr(artifacts, "write_model_gguf", wrong_template)
    out = tmp_path / "gguf"
    rc = main(["export", str(run_copy), "--format", "gguf", "--quant", "f16", "-o", str(out), "--runtime",
               "transformers", "--no-measure"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "chat template" in cap.err
    assert not out.exists()
    failed = tmp_path / "gguf.failed"
    report = json.loads((failed / REPORT_NAME).read_text())
    assert report["status"] == "failed"
    assert any("chat template" in f for p in report["parity"] for f in p["failures"])
    # a failed export is not recorded in the run's model card
    assert not (run_copy / "exports.json").exists()


@pytest.mark.slow  # about 64 s on 2 cores: a full export and its checks
def test_planted_wrong_stop_token_in_gguf_is_caught(run_copy, tmp_path, monkeypatch):
    import qlorakit.export.artifacts as artifacts

    real = artifacts.write_model_gguf

    def wrong_eos(path, state, config, tokenizer, *a, **kw):
        import copy

        tok = copy.deepcopy(tokenizer)
        tok.eos_token = "<|endoftext|>"  # instead of <|im_end|>
        assert tok.eos_token_id == 0
        return real(path, state, config, tok, *a, **kw)

    monkeypatch.setattr(artifacts, "write_model_gguf", wrong_eos)
    res = export_run(run_copy, "gguf", tmp_path / "gguf", quant="f16", runtime="transformers", measure=False)
    assert not res.passed
    assert any("does not stop at '<|im_end|>'" in r for r in res.reasons)


@pytest.mark.slow  # about 92 s on 2 cores: a full export and its checks
def test_tampered_modelfile_is_caught(run_copy, tmp_path, capsys):
    out = tmp_path / "ollama"
    res = export_run(run_copy, "ollama", out, quant="f16", runtime="transformers", measure=False)
    assert res.passed, res.reasons
    mf = out / "Modelfile"
    mf.write_text(mf.read_text().replace('PARAMETER stop "<|im_end|>"\n', ""))
    rc = main(["export", "--check", str(out), "--runtime", "transformers"])
    cap = capsys.readouterr()
    assert rc == 1 and "PARAMETER stop" in cap.err
    mf.write_text(mf.read_text().replace("SYSTEM", "# SYSTEM"))
    rc = main(["export", "--check", str(out), "--runtime", "transformers"])
    cap = capsys.readouterr()
    assert rc == 1 and "Modelfile TEMPLATE/SYSTEM" in cap.err
