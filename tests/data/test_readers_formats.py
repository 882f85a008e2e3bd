"""Readers (JSONL, JSON, CSV, Parquet, a saved `datasets` folder), record forms and field mapping."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlorakit.data import DataError, read_records, sha256_path, to_examples
from qlorakit.data.formats import detect_format, example_text

ROWS = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(5)]


def test_parquet_reads_rows_with_row_numbers(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    recs = read_records(path)
    assert [r["_line"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["output"] for r in recs] == [r["output"] for r in ROWS]
    ex = to_examples(recs, path)
    assert ex[3].messages == [{"role": "user", "content": "Question 3?"}, {"role": "assistant", "content": "Answer 3."}]


def test_datasets_folder_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds.select(range(3)), "test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert [r["instruction"] for r in read_records(tmp_path / "one")] == [r["instruction"] for r in ROWS]
    assert len(read_records(tmp_path / "dd")) == 3  # the train split
    assert len(read_records(tmp_path / "dd" / "test")) == 5
    # a folder hash covers every file and changes when one does
    h = sha256_path(tmp_path / "one")
    (tmp_path / "one" / "dataset_info.json").write_text("{}", encoding="utf-8")
    assert sha256_path(tmp_path / "one") != h


def test_csv_and_json_array(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,response\nHi there,Hello!\n\"Multi\nline\",ok\n", encoding="utf-8")
    recs = read_records(csv_path)
    assert [r["_line"] for r in recs] == [2, 4]  # the physical line where each row ends
    ex = to_examples(recs, csv_path)
    assert ex[1].messages[0]["content"] == "Multi\nline"
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    assert len(to_examples(read_records(json_path), json_path)) == 5


@pytest.mark.parametrize("rec,form", [
    ({"prompt": "p", "response": "r"}, "instruction"),
    ({"question": "q", "answer": "a"}, "instruction"),
    ({"Question": "q", "Answer": "a"}, "instruction"),
    ({"prompt": "p", "completion": "c"}, "instruction"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "chat"),
    ({"turns": [{"speaker": "USER", "utterance": "u"}, {"speaker": "SYSTEM", "utterance": "s"}]}, "chat"),
    ({"original": [["customer", "u"], ["agent", "a"]]}, "chat"),
    ({"text": "plain"}, "completion"),
    ({"foo": "bar"}, None),
])
def test_detect_format(rec, form):
    assert detect_format(rec) == form


def test_aliases_map_to_instruction_and_output(tmp_path):
    recs = [{"question": "What is 2+2?", "context": "Arithmetic.", "answer": "4", "_line": 1},
            {"prompt": "Say hi", "response": "Hi!", "_line": 2}]
    ex = to_examples(recs, tmp_path / "x.jsonl")
    assert ex[0].messages == [{"role": "user", "content": "What is 2+2?\n\nArithmetic."},
                              {"role": "assistant", "content": "4"}]
    assert ex[1].messages[-1] == {"role": "assistant", "content": "Hi!"}


def test_explicit_field_mapping_and_form_override(tmp_path):
    recs = [{"q": "Why?", "a": "Because.", "text": "ignored", "_line": 1}]
    # 'text' alone would make it a completion; the mapping plus the override make it an instruction
    ex = to_examples(recs, tmp_path / "x.jsonl", "instruction", {"q": "instruction", "a": "output"})
    assert ex[0].messages == [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    ex = to_examples(recs, tmp_path / "x.jsonl", "completion")
    assert ex[0].text == "ignored"


def test_sgd_dialogue_reads_as_chat(shared):
    path = shared / "dialogue" / "sgd_train_first2_per_file.json"
    recs = read_records(path)
    ex = to_examples(recs, path)
    assert len(ex) == len(recs) == 192
    first = recs[0]["turns"]
    msgs = ex[0].messages
    # USER -> user, SYSTEM -> assistant, in order, with the utterances unchanged
    assert msgs[0] == {"role": "user", "content": first[0]["utterance"]}
    assert msgs[1] == {"role": "assistant", "content": first[1]["utterance"]}
    assert len(msgs) == len(first)
    assert all(m["role"] in ("user", "assistant") for e in ex for m in e.messages)


def test_abcd_joins_consecutive_turns_and_skips_actions(shared):
    path = shared / "dialogue" / "abcd_sample.json"
    ex = to_examples(read_records(path), path)
    msgs = ex[0].messages
    assert msgs[0] == {"role": "assistant", "content": "Hi!\nHow can I help you?"}
    assert not any("Account has been pulled up" in m["content"] for m in msgs)
    assert all(a["role"] != b["role"] for a, b in zip(msgs, msgs[1:]))


def test_oasst_marked_turns_and_self_instruct_instances(shared):
    path = shared / "instruction" / "oasst1_val_en.jsonl"
    recs = read_records(path)
    ex = to_examples(recs, path)
    multi = next(i for i, r in enumerate(recs) if r["input"].count("### Human:") >= 2)
    roles = [m["role"] for m in ex[multi].messages]
    assert roles[0] == "system" and roles[1:4] == ["user", "assistant", "user"] and roles[-1] == "assistant"
    assert "### Human" not in example_text(ex[multi])
    si = shared / "instruction" / "self_instruct_seed_tasks.jsonl"
    recs = read_records(si)
    ex = to_examples(recs, si)
    assert ex[0].messages[-1]["content"] == recs[0]["instances"][0]["output"]


def test_instruction_input_is_kept_unless_the_instruction_ends_with_it(tmp_path):
    """OASST's prompt is a preamble and then its input: the input is not repeated. A short input
    that merely occurs inside the instruction is data of its own and is kept."""
    recs = [{"instruction": "Is the following word positive or negative?", "input": "positive", "output": "Positive."},
            {"instruction": "What is 12 times 3?", "input": "3", "output": "36"},
            {"instruction": "Preamble. ### Human: what is a prime number?", "input": "### Human: what is a prime number?",
             "output": "A number with exactly two divisors."},
            {"instruction": "Summarise.", "input": "Summarise.", "output": "Done."}]
    ex = to_examples(recs, tmp_path / "x.jsonl")
    users = [e.messages[-2]["content"] for e in ex]
    assert users[0] == "Is the following word positive or negative?\n\npositive"
    assert users[1] == "What is 12 times 3?\n\n3"
    assert users[2] == "what is a prime number?" and ex[2].messages[0] == {"role": "system", "content": "Preamble."}
    assert users[3] == "Summarise."


# ---- malformed input: one clear error naming the file and the row ----


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_records(p)


def test_unicode_line_separators_inside_json_strings_stay_in_their_record(tmp_path):
    # JSON allows U+2028, U+2029 and U+0085 unescaped inside strings (json.dumps with
    # ensure_ascii=False writes them so); records are split at "\n" only, and later lines keep
    # their line numbers
    first = {"instruction": "Opening hours\u2028weekdays", "output": "9 to 5\x85Sat 10 to 2\u2029"}
    p = tmp_path / "sep.jsonl"
    p.write_text(json.dumps(first, ensure_ascii=False) + "\r\n" + '{"instruction": "q", "output": "r"}\n'
                 + '{"instruction": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"sep\.jsonl:3: malformed JSON"):
        read_records(p)
    p.write_text(p.read_text(encoding="utf-8").rsplit("{", 1)[0], encoding="utf-8")
    recs = read_records(p)
    assert [r["_line"] for r in recs] == [1, 2]
    assert recs[0]["instruction"] == first["instruction"] and recs[0]["output"] == first["output"]
    ex = to_examples(recs, p, "instruction")
    assert ex[0].messages[-1]["content"] == first["output"]


def test_json_lines_in_a_json_file_name_the_bad_line(tmp_path):
    p = tmp_path / "jl.json"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
                 '{"instruction": "e", "output": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"jl\.json:3: malformed JSON"):
        read_records(p)
    p.write_text(p.read_text(encoding="utf-8").rsplit("{", 1)[0], encoding="utf-8")
    assert [r["_line"] for r in read_records(p)] == [1, 2]
    p.write_text('[{"text": "a"},\n{"text": }]\n', encoding="utf-8")  # a broken array: JSON's own error
    with pytest.raises(DataError, match=r"jl\.json:2: malformed JSON \(Expecting value"):
        read_records(p)


def test_csv_header_naming_a_column_twice_is_refused(tmp_path):
    p = tmp_path / "dup.csv"
    p.write_text("instruction,output,instruction\nq,a,q2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dup\.csv:1: column\(s\) 'instruction' named more than once"):
        read_records(p)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_a_field_named_like_the_line_number_is_refused_not_overwritten(tmp_path, suffix):
    rows = [dict(ROWS[0]), dict(ROWS[1], _line="ticket 7")]  # the second record has the reserved name
    p = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        where = r"d\.jsonl:2"
    elif suffix == ".json":
        p.write_text(json.dumps(rows), encoding="utf-8")
        where = r"d\.json: record 2"
    elif suffix == ".csv":
        p.write_text("instruction,output,_line\nq,a,\nq2,a2,ticket 7\n", encoding="utf-8")
        where = r"d\.csv:2"  # a column is in every row: the first row is named
    else:
        pq.write_table(pa.Table.from_pylist([dict(r, _line=r.get("_line", "")) for r in rows]), p)
        where = r"d\.parquet: row 1"
    with pytest.raises(DataError, match=where + r": the record has a field named '_line'.*rename it"):
        read_records(p)


def test_missing_column_names_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,input\nhello,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:2: missing field 'output'"):
        to_examples(read_records(p), p, "instruction")


def test_wrong_types_name_row(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"instruction": "x", "output": 42}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'output' must be a string, got int"):
        to_examples(read_records(p), p)
    p = write_jsonl(tmp_path / "t.jsonl", [{"turns": [{"speaker": "USER", "utterance": 3}]}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: turns\[0\]"):
        to_examples(read_records(p), p)
    for role in (["user"], {"a": 1}, 3):
        p = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": role, "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}])
        with pytest.raises(DataError, match=r"r\.jsonl:1: messages\[0\]\.role must be one of system, user, assistant"):
            to_examples(read_records(p), p)
    q = tmp_path / "w.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]), q)
    with pytest.raises(DataError, match=r"w\.parquet:2: missing field 'output'"):
        to_examples(read_records(q), q)


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.jsonl", b"", r"empty\.jsonl: the file is empty"),
    ("blank.csv", b"\n\n", r"blank\.csv: the file is empty"),
    ("latin.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"), r"latin\.jsonl:1: not valid UTF-8"),
    ("fake.parquet", b'{"text": "this is JSON"}\n', r"fake\.parquet: not a Parquet file"),
    ("trunc.parquet", b"PAR1garbagePAR1", r"trunc\.parquet: not a readable Parquet file"),
])
def test_unreadable_files(tmp_path, name, content, pattern):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        read_records(p)


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "x.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match="not a saved `datasets` folder"):
        read_records(tmp_path)


def test_a_conversation_opened_by_the_assistant_tokenizes(shared):
    """ABCD's agent speaks first; a chat record may too. The first turn's answer tokens are what
    the template writes for its text, and the ids are those of the rendered conversation."""
    from qlorakit.data import IGNORE_INDEX
    from qlorakit.data.templating import tokenize_example
    from qlorakit.models import load_tokenizer, resolve_base

    tok = load_tokenizer(resolve_base("default")[0])
    path = shared / "dialogue" / "abcd_sample.json"
    abcd = to_examples(read_records(path), path)[0]
    hand = to_examples([{"messages": [{"role": "assistant", "content": "Hello, how can I help?"},
                                      {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"}]}], "x.jsonl")[0]
    for ex in (abcd, hand):
        assert ex.messages[0]["role"] == "assistant"
        t = tokenize_example(tok, ex, 4096)
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        full = tok.apply_chat_template(ex.messages[:last + 1], tokenize=False)  # turns after the last answer teach nothing
        assert t.input_ids == list(tok(full, add_special_tokens=False)["input_ids"])
        learned = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE_INDEX])
        assistant = [m["content"] for m in ex.messages if m["role"] == "assistant"]
        assert learned == "".join(f"{c}<|im_end|>\n" for c in assistant)
