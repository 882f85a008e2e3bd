"""Bad input ends with a non-zero exit code and one message naming the file and line or key."""

from __future__ import annotations

import json

import pytest

from qlorakit.cli import main


def _train(capsys, *args) -> tuple[int, str]:
    code = main(["train", *args, "train.progress=false"])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture()
def run_args(tiny_model_dir, tmp_path):
    return [f"model.base={tiny_model_dir}", f"output_dir={tmp_path / 'runs'}", "name=bad"]


def _lines(err: str) -> list[str]:
    return [l for l in err.splitlines() if l.strip() and not l.startswith("qlorakit: ")]


def test_malformed_json_line(capsys, tmp_path, run_args):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{not json\n")
    code, err = _train(capsys, f"data.train={f}", *run_args)
    assert code == 2
    assert f"{f}:2: malformed JSON" in err and len(_lines(err)) == 1
    assert not (tmp_path / "runs" / "bad").exists()  # nothing half-made


def test_missing_field(capsys, tmp_path, run_args):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    code, err = _train(capsys, f"data.train={f}", *run_args)
    assert code == 2 and f"{f}:2: missing field 'output'" in err


def test_empty_file(capsys, tmp_path, run_args):
    f = tmp_path / "d.jsonl"
    f.write_text("")
    code, err = _train(capsys, f"data.train={f}", *run_args)
    assert code == 2 and f"{f}: the file is empty" in err


def test_not_utf8(capsys, tmp_path, run_args):
    f = tmp_path / "d.csv"
    f.write_bytes(b"instruction,output\nhello,w\xe9rld\n")
    code, err = _train(capsys, f"data.train={f}", *run_args)
    assert code == 2 and f"{f}:2: not valid UTF-8" in err


def test_csv_missing_column(capsys, tmp_path, run_args):
    f = tmp_path / "d.csv"
    f.write_text("instruction,notes\nhello,world\n")
    code, err = _train(capsys, f"data.train={f}", *run_args)
    assert code == 2 and f"{f}:2: missing field 'output'" in err


def test_unknown_recipe_key(capsys, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("train:\n  learning_rate: 1e-4\n")
    code, err = _train(capsys, str(r))
    assert code == 2 and f"{r}" in err and "train.learning_rate: unknown key; did you mean 'train.lr'?" in err


def test_mistyped_recipe_value(capsys):
    code, err = _train(capsys, "train.micro_batch_size=four")
    assert code == 2 and "train.micro_batch_size: expected an integer, got 'four'" in err


def test_base_model_path_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    code, err = _train(capsys, f"model.base={missing}", f"output_dir={tmp_path}")
    assert code == 2 and "model.base:" in err and str(missing) in err and "does not exist" in err


def test_hub_id_fails_fast_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _train(capsys, "model.base=someorg/some-model-that-is-not-cached", f"output_dir={tmp_path}")
    assert code == 2 and "someorg/some-model-that-is-not-cached" in err and "HF_HUB_OFFLINE" in err


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
