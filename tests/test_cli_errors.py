"""Bad input ends with a non-zero exit code and one message naming the file and line or key."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_output_dir_that_cannot_hold_runs_fails_before_any_work(capsys, tmp_path, tiny_model_dir):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, err = _train(capsys, f"model.base={tiny_model_dir}", f"output_dir={a_file}", "name=x")
    assert code == 2 and f"output_dir={a_file}: {a_file} is a file, not a folder" in err
    assert a_file.read_text() == "mine"
    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("mine")
    code, err = _train(capsys, f"model.base={tiny_model_dir}", f"output_dir={tmp_path / 'runs'}", "name=taken",
                       "data.train=/nonexistent.jsonl")
    assert code == 2 and f"{taken} exists" in err  # said before the data is even read


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A finished one-step run of the tiny model (no end-of-run evaluation)."""
    from qlorakit.config import load_recipe
    from qlorakit.train import train

    return train(load_recipe(None, [f"model.base={tiny_model_dir}", f"output_dir={tmp_path_factory.mktemp('runs')}",
                                    "name=r", "train.max_steps=1", "data.max_seq_len=64", "train.progress=false",
                                    "train.checkpoint_every=0"]), finish=False)


def test_a_damaged_adapter_file_is_named(capsys, tmp_path, finished_run):
    import shutil

    run = Path(shutil.copytree(finished_run, tmp_path / "copy"))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    capsys.readouterr()
    assert main(["generate", str(run), "hello"]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: cannot be read as safetensors" in err and "Traceback" not in err


def test_a_prompt_longer_than_the_context_is_refused(capsys, finished_run):
    capsys.readouterr()
    assert main(["generate", str(finished_run), "hello world " * 700]) == 2  # the tiny model reads 1024 positions
    err = capsys.readouterr().err
    assert "the model reads at most 1024" in err and "shorten the prompt" in err


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "-5"], "argument --max-new-tokens: expected a value >= 1, got -5"),
    (["--temperature", "-1"], "argument --temperature: expected a value >= 0, got -1"),
    (["--temperature", "nan"], "argument --temperature: expected a value >= 0, got nan"),
    (["--top-p", "0"], "argument --top-p: expected a value > 0 and <= 1, got 0"),
])
def test_generate_refuses_sampling_settings_out_of_range(capsys, tmp_path, args, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "hello", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
