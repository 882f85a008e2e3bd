"""Overlap with the evaluation sets: planted TruthfulQA, MMLU and HellaSwag rows are found per set."""

from __future__ import annotations

import json
import random

from qlorakit.data import read_records
from qlorakit.data.check import CheckOptions, load_source, run_checks
from qlorakit.data.cli import data_main
from qlorakit.data.contamination import EVAL_SETS, build_index, find_contamination, words


def _reference_overlap(train: str, item_segments: list[str], n: int, min_words: int) -> bool:
    """Plain-Python GPT-3-style check: a shared n-gram, or a short segment contained whole."""
    tw = words(train)
    for seg in item_segments:
        sw = words(seg)
        if len(sw) < min_words:
            continue
        k = min(n, len(sw))
        grams = {tuple(sw[i:i + k]) for i in range(len(sw) - k + 1)}
        if any(tuple(tw[i:i + k]) in grams for i in range(len(tw) - k + 1)):
            return True
    return False


def test_matches_reference_implementation(shared):
    s = EVAL_SETS["truthfulqa"]
    items = s.items(shared)[:60]
    index = build_index([str(shared / "truthfulqa" / "TruthfulQA.csv")], n=6, min_words=4)
    rng = random.Random(5)
    texts = []
    for _, segs in items[:30]:  # a window of each item's question, inside unrelated words
        ws = segs[0].split()
        a = rng.randint(0, max(0, len(ws) - 7))
        texts.append("some unrelated words here " + " ".join(ws[a:a + rng.randint(3, 9)]) + " and more after")
    hits = {c.record for c in find_contamination(texts, index)}
    all_items = [i[1] for i in s.items(shared)]
    # the generic file loader reads every string column; the reference does the same
    rows = read_records(shared / "truthfulqa" / "TruthfulQA.csv")
    ref = {i for i, t in enumerate(texts)
           if any(_reference_overlap(t, [v for k, v in r.items() if isinstance(v, str)], 6, 4) for r in rows)}
    assert hits == ref and 0 < len(hits) < len(texts)
    assert len(all_items) == 817


def _clean(shared):
    out = []
    for name in ("self_instruct_user_oriented.jsonl", "self_instruct_seed_tasks.jsonl"):
        for r in read_records(shared / "instruction" / name):
            out.append({"instruction": r["instruction"], "input": r["instances"][0]["input"],
                        "output": r["instances"][0]["output"]})
    return out


def test_clean_sample_is_not_contaminated(shared, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "clean.jsonl", _clean(shared))
    oasst = shared / "instruction" / "oasst1_val_en.jsonl"
    report = run_checks([load_source(path, licence="Apache-2.0"), load_source(oasst)])
    assert report.counts["records"] >= 800
    assert report.counts["contaminated_records"] == 0
    assert set(report.counts["contamination"]) == set(EVAL_SETS)  # every set was checked


def test_planted_eval_rows_found_per_set_and_dropped(shared, tmp_path, write_jsonl):
    recs = _clean(shared)
    rng = random.Random(13)
    tqa = read_records(shared / "truthfulqa" / "TruthfulQA.csv")
    mmlu = read_records(shared / "benchmarks" / "mmlu_val_zero_shot.jsonl")
    hs = read_records(shared / "benchmarks" / "hellaswag_val_first1000.jsonl")
    planted_ids: dict[str, list[int]] = {"truthfulqa": [], "mmlu": [], "hellaswag": []}
    # as a training pair: question -> best answer (items under the 8-word floor are not checked, by design)
    tqa = [r for r in tqa if len(words(r["Question"] + " " + r["Best Answer"])) >= 8]
    for r in rng.sample(tqa, 8):
        recs.append({"instruction": r["Question"], "input": "", "output": r["Best Answer"]})
        planted_ids["truthfulqa"].append(id(recs[-1]))
    for r in rng.sample(mmlu, 8):  # the question body and its choices, reformatted
        body = r["input"].split("\n\n", 1)[1].replace("\nAnswer:", "")
        recs.append({"instruction": "Pick the right option.", "input": body.lower(), "output": r["output"]})
        planted_ids["mmlu"].append(id(recs[-1]))
    for r in rng.sample(hs, 4):  # a story continued with the right ending
        recs.append({"instruction": "Continue the story.", "input": r["ctx"], "output": r["endings"][r["label"]]})
        planted_ids["hellaswag"].append(id(recs[-1]))
    rng.shuffle(recs)  # planted rows anywhere in the file
    row_of = {id(r): i for i, r in enumerate(recs, start=1)}
    planted = {k: {row_of[x] for x in v} for k, v in planted_ids.items()}
    path = write_jsonl(tmp_path / "train.jsonl", recs)
    report = run_checks([load_source(path, licence="Apache-2.0")], CheckOptions(eval_sets=["truthfulqa", "mmlu", "hellaswag"]))
    found = {f["kind"]: {h["row"] for h in f["hits"]} for f in report.findings if f["check"] == "contamination"}
    assert found == planted
    assert report.counts["contamination"] == {k: len(v) for k, v in planted.items()}

    out = tmp_path / "clean_copy.jsonl"
    code = data_main(["check", str(path), "--licence", "Apache-2.0", "--eval-sets", "truthfulqa,mmlu,hellaswag",
                      "--drop-contaminated", str(out), "--json"])
    assert code == 0
    kept = read_records(out)
    assert len(kept) == len(recs) - sum(len(v) for v in planted.values())
    bad = set().union(*planted.values())
    assert [r["output"] for r in kept] == [r["output"] for i, r in enumerate(recs, start=1) if i not in bad]


def test_ngram_size_is_configurable(shared, tmp_path, write_jsonl):
    q = read_records(shared / "truthfulqa" / "TruthfulQA.csv")[0]["Question"]  # 9 words
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Someone asked me: {q} I did not know."}])
    for n, min_words, hit in ((13, 8, True), (13, 10, False), (5, 5, True)):
        opts = CheckOptions(eval_sets=["truthfulqa"], ngram=n, min_words=min_words)
        report = run_checks([load_source(path, licence="MIT")], opts)
        assert (report.counts["contaminated_records"] == 1) is hit, (n, min_words)


def test_fail_on_contamination_blocks(shared, tmp_path, write_jsonl, capsys):
    q = read_records(shared / "truthfulqa" / "TruthfulQA.csv")[3]
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": q["Question"], "output": q["Best Answer"]}])
    assert data_main(["check", str(path), "--licence", "MIT", "--eval-sets", "truthfulqa"]) == 0
    assert "1 training record(s) overlap truthfulqa" in capsys.readouterr().out
    assert data_main(["check", str(path), "--licence", "MIT", "--eval-sets", "truthfulqa",
                      "--fail-on", "contamination", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["blocking"] == 1 and out["counts"]["contamination"] == {"truthfulqa": 1}


def test_eval_items_in_unspaced_scripts_are_checked(tmp_path, write_jsonl):
    # a Chinese question is one or two "words" of letters between punctuation marks, fewer than
    # min_words, so it was never checked; each character now counts as a word
    question = "请问在收到商品后多少天内可以申请退货并获得全额退款？"
    evals = write_jsonl(tmp_path / "eval_zh.jsonl", [{"question": question, "answer": "三十天"}])
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"instruction": "回答顾客的问题：" + question, "output": "您可以在三十天内申请退货。"},
        {"instruction": "收到商品后可以更换尺码吗？", "output": "七天内可以更换。"}  # shares 5 characters,
    ])
    index = build_index([str(evals)])
    assert len(words(question)) >= 20
    report = run_checks([load_source(train, licence="MIT")], CheckOptions(eval_sets=[str(evals)]))
    assert report.counts["contaminated_records"] == 1
    (hit,) = find_contamination([read_records(train)[0]["instruction"]], index)
    assert hit.record == 0


def test_hindi_eval_items_match_whole_words(tmp_path, write_jsonl):
    # Hindi words were cut at their vowel signs, which were dropped: a training text with other words
    # on the same consonants (का/की/को, भेजा/भेजी, ...) shared every "13-gram" with the question
    question = "आपका ऑर्डर कल भेजा गया था और यह तीन दिनों में आपके घर पहुँच जाएगा, क्या ट्रैकिंग नंबर की जाँच करें?"
    other = "आपकी ऑर्डर कल भेजी गयी थी और यह तीन दिन में आपको घर पहुँचा जाएगी, क्या ट्रैकिंग नंबर का जाँच करो?"
    evals = write_jsonl(tmp_path / "eval_hi.jsonl", [{"question": question, "answer": "हाँ"}])
    index = build_index([str(evals)])
    assert len(words(question)) == 21
    hits = find_contamination(["ग्राहक का प्रश्न: " + question, other], index)
    assert [h.record for h in hits] == [0]
