"""`qlorakit data inspect` and `check` from the command line: output, exit codes, clear errors, no debris."""

from __future__ import annotations

import json
import math

import pytest

from qlorakit.data.cli import build_parser, data_main, register_subcommand
from qlorakit.data.inspect import inspect_file, length_histogram, length_stats

RECS = [
    {"instruction": "what is the capital of france", "input": "", "output": "paris is the capital"},
    {"messages": [{"role": "user", "content": "how do i reset my password"},
                  {"role": "assistant", "content": "click forgot password on the login page"}]},
    {"text": "a plain completion text with some words in it"},
]


def test_inspect_counts_tokens_like_the_chat_template(tmp_path, tiny_tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "mixed.jsonl", RECS * 4)
    r = inspect_file(path, tiny_tokenizer, max_seq_len=24)
    assert (r["rows"], r["examples"]) == (12, 12)
    assert r["forms"] == {"instruction": 4, "chat": 4, "completion": 4}
    assert r["fields"]["messages"] == {"present": 4, "types": {"list": 4}}
    # reference: the rendered conversation tokenized at once (+ eos for plain text)
    msgs = [{"role": "user", "content": RECS[0]["instruction"]}, {"role": "assistant", "content": RECS[0]["output"]}]
    ref0 = len(tiny_tokenizer(tiny_tokenizer.apply_chat_template(msgs, tokenize=False),
                              add_special_tokens=False)["input_ids"])
    ref2 = len(tiny_tokenizer(RECS[2]["text"], add_special_tokens=False)["input_ids"]) + 1
    assert r["lengths"][0] == ref0 and r["lengths"][2] == ref2
    t = r["tokens"]
    assert t["max"] == max(r["lengths"]) and t["min"] == min(r["lengths"]) and t["total"] == sum(r["lengths"])
    assert t["over_max_seq_len"] == sum(x > 24 for x in r["lengths"])
    pk = r["packing"]
    assert pk["sequences"] >= math.ceil(sum(min(x, 24) for x in r["lengths"]) / 24)
    assert pk["examples_per_sequence"] == round(pk["examples"] / pk["sequences"], 2)
    assert sum(h["count"] for h in r["histogram"]) == 12


def test_length_stats_and_histogram():
    s = length_stats(list(range(1, 101)), 50)
    assert (s["p50"], s["p90"], s["p99"], s["max"], s["over_max_seq_len"]) == (50, 90, 99, 100, 50)
    h = length_histogram([0, 5, 9, 10, 19], bins=2)
    assert [(b["lo"], b["hi"], b["count"]) for b in h] == [(0, 10, 3), (10, 20, 2)]
    h = length_histogram([100, 101, 130, 139], bins=4)
    assert [(b["lo"], b["hi"], b["count"]) for b in h] == [(100, 110, 2), (110, 120, 0), (120, 130, 0), (130, 140, 2)]


def test_inspect_cli_writes_plot_and_json(tmp_path, tiny_tokenizer, write_jsonl, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", RECS)
    plot = tmp_path / "plots" / "lengths.png"
    code = data_main(["inspect", str(path), "--tokenizer", str(tiny_tokenizer.folder), "--max-seq-len", "64",
                      "--plot", str(plot), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"][0]["rows"] == 3 and out["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data_main(["inspect", str(path), "--no-tokens"]) == 0
    assert "form: instruction 1, chat 1, completion 1 (detected)" in capsys.readouterr().out


@pytest.mark.parametrize("name,content,where", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', "bad.jsonl:2: malformed JSON"),
    ("missing.csv", "instruction,input\nhi,there\n", "missing.csv:2: missing field 'output'"),
    ("types.jsonl", '{"instruction": "a", "output": ["b"]}\n', "types.jsonl:1: field 'output' must be a string"),
    ("empty.jsonl", "", "empty.jsonl: the file is empty"),
    ("notparquet.parquet", "instruction,output\n", "notparquet.parquet: not a Parquet file"),
])
def test_check_malformed_input_one_error_no_output(tmp_path, capsys, name, content, where):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    out_dir = tmp_path / "out"
    code = data_main(["check", str(good), str(path), "--licence", "MIT", "--redact", str(out_dir)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and where in err[0]
    assert not out_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "good.jsonl"])


def test_not_utf8_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert data_main(["check", str(path)]) == 2
    assert "latin.jsonl:2: not valid UTF-8" in capsys.readouterr().err


def test_failed_write_leaves_nothing(tmp_path, write_jsonl, capsys):
    path = write_jsonl(tmp_path / "nested.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]}])
    out = tmp_path / "copy.csv"
    assert data_main(["check", str(path), "--licence", "MIT", "--no-contamination", "--redact", str(out)]) == 2
    assert "nested data, which CSV cannot" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nested.jsonl"]


def test_output_may_not_overwrite_input(tmp_path, write_jsonl, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    assert data_main(["check", str(path), "--licence", "MIT", "--no-contamination", "--redact", str(path)]) == 2
    assert "would overwrite its input" in capsys.readouterr().err


def test_drop_contaminated_needs_the_contamination_check(tmp_path, write_jsonl, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    out = tmp_path / "clean.jsonl"
    assert data_main(["check", str(path), "--no-contamination", "--drop-contaminated", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlorakit data check: --drop-contaminated") and "--no-contamination" in err
    assert err.count("qlorakit data check:") == 1
    assert not out.exists()
    assert data_main(["check"]) == 2
    assert capsys.readouterr().err.strip() == "qlorakit data check: name at least one FILE, or --recipe RECIPE.yaml"


def test_written_copies_and_plots_are_as_readable_as_other_files(tmp_path, write_jsonl, tiny_tokenizer, capsys):
    """Outputs get the mode a plain open() would give them (0666 less the umask), not mkstemp's 0600."""
    import os

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "my e-mail is jo.bloggs@gmail.com", "output": "ok"}])
    old = os.umask(0o022)
    try:
        assert data_main(["check", str(path), "--licence", "MIT", "--no-contamination",
                          "--redact", str(tmp_path / "red.jsonl")]) == 0
        assert data_main(["inspect", str(path), "--tokenizer", str(tiny_tokenizer.folder),
                          "--plot", str(tmp_path / "h.png")]) == 0
    finally:
        os.umask(old)
    for name in ("red.jsonl", "h.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert "jo.bloggs@gmail.com" not in (tmp_path / "red.jsonl").read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        data_main(["inspect", str(path), "--max-seq-len", "-5"])
    assert "--max-seq-len: expected a value >= 16, got -5" in capsys.readouterr().err


def test_other_modules_can_register_a_subcommand(capsys):
    def setup(sub):
        p = sub.add_parser("hello-test", help="a test subcommand")
        p.add_argument("--name", default="x")
        p.set_defaults(func=lambda a: print(f"hi {a.name}") or 0)

    register_subcommand(setup)
    try:
        assert data_main(["hello-test", "--name", "y"]) == 0
        assert capsys.readouterr().out.strip() == "hi y"
    finally:
        from qlorakit.data import cli

        cli._REGISTERED.remove(setup)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["hello-test"])
