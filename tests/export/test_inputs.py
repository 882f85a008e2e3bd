"""Bad input: a clear error (exit 2), and nothing existing is overwritten without --force."""

from __future__ import annotations

import shutil

import pytest

from qlorakit.cli import main


def _run(args, capsys):
    rc = main(["export", *args])
    return rc, capsys.readouterr().err


def test_run_without_adapter(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "adapter")
    rc, err = _run([str(run), "--format", "peft", "-o", str(tmp_path / "out")], capsys)
    assert rc == 2
    assert "no trained adapter" in err and "adapter/adapter_model.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_not_a_run_folder(tmp_path, capsys):
    rc, err = _run([str(tmp_path), "--format", "peft", "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "no recipe.yaml" in err
    rc, err = _run([str(tmp_path / "nope"), "--format", "peft", "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "no such run folder" in err


@pytest.mark.parametrize("args,needle", [
    (["--format", "gguff", "-o", "OUT"], "unknown format (did you mean 'gguf'?)"),
    (["--format", "gguf", "--quant", "q4_k_m", "-o", "OUT"], "unknown or unsupported quant type"),
    (["--format", "gguf", "--quant", "Q8_0", "-o", "OUT"], "did you mean 'q8_0'?"),
    (["--format", "merged", "--dtype", "int8", "-o", "OUT"], "--dtype 'int8': unknown type"),
    (["--format", "merged", "--quant", "q8_0", "-o", "OUT"], "takes --dtype"),
    (["--format", "gguf", "--dtype", "bf16", "-o", "OUT"], "takes --quant"),
    (["--format", "merged", "--dtype", "nf4", "--no-check", "-o", "OUT"], "needs the parity check"),
    (["--format", "peft"], "-o OUT is required"),
    (["-o", "OUT"], "--format is required"),
])
def test_bad_options(tiny_run, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    rc, err = _run([str(tiny_run), *[str(out) if a == "OUT" else a for a in args]], capsys)
    assert rc == 2, err
    assert needle in err
    assert not out.exists()


def test_bad_override(tiny_run, tmp_path, capsys):
    rc, err = _run([str(tiny_run), "--format", "peft", "-o", str(tmp_path / "o"), "train.lr=1"], capsys)
    assert rc == 2 and "only export.* keys" in err
    rc, err = _run([str(tiny_run), "--format", "peft", "-o", str(tmp_path / "o"),
                    "export.max_token_disagreement=2"], capsys)
    assert rc == 2 and "expected a share between 0 and 1" in err


def test_existing_output_is_not_overwritten_without_force(run_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = _run([str(run_copy), "--format", "peft", "-o", str(out), "--no-measure"], capsys)
    assert rc == 2 and "exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    f = tmp_path / "file.bin"
    f.write_text("data")
    rc, err = _run([str(run_copy), "--format", "peft", "-o", str(f)], capsys)
    assert rc == 2 and f.read_text() == "data"

    rc, err = _run([str(run_copy), "--format", "peft", "-o", str(out), "--force", "--no-measure"], capsys)
    assert rc == 0, err
    assert not (out / "keep.txt").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_output_inside_the_run_is_refused_even_with_force(tiny_run, capsys):
    rc, err = _run([str(tiny_run), "--format", "peft", "-o", str(tiny_run / "adapter"), "--force"], capsys)
    assert rc == 2 and "part of the run folder" in err
    assert (tiny_run / "adapter" / "adapter_model.safetensors").is_file()
    # nor over any other part of the run: its recipe, evaluation, card, ledger, metrics
    for part in ("recipe.yaml", "eval", "MODEL_CARD.md", "data_manifest.json", "metrics.jsonl", "eval/sub"):
        rc, err = _run([str(tiny_run), "--format", "peft", "-o", str(tiny_run / part), "--force", "--no-check"],
                       capsys)
        assert rc == 2 and "part of the run folder" in err, part
    assert (tiny_run / "recipe.yaml").is_file()
    rc, err = _run([str(tiny_run), "--format", "peft", "-o", str(tiny_run), "--force"], capsys)
    assert rc == 2 and "would overwrite the run folder" in err


def test_an_unchecked_export_is_not_called_passed(run_copy, tmp_path, capsys):
    import json
    import os

    old = os.umask(0o022)
    try:
        rc = main(["export", str(run_copy), "--format", "peft", "-o", str(run_copy / "exports" / "peft"),
                   "--no-check", "--no-measure"])
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    assert rc == 0 and "written, not checked (--no-check)" in out and "export passed" not in out
    folder = run_copy / "exports" / "peft"  # a new folder inside the run is fine
    assert json.loads((folder / "export_report.json").read_text())["status"] == "unchecked"
    assert folder.stat().st_mode & 0o777 == 0o755  # readable by a server running as another user
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.rglob("*") if p.is_file())


def test_check_of_a_folder_that_is_not_an_export(tmp_path, capsys):
    rc, err = _run(["--check", str(tmp_path)], capsys)
    assert rc == 2 and "export_report.json" in err
