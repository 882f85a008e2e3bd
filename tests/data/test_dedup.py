"""Exact and near duplicates: planted ones are all found, in the right groups; a clean sample gives none."""

from __future__ import annotations

import itertools
import random

import pytest

from qlorakit.data import read_records
from qlorakit.data.check import CheckOptions, load_source, run_checks
from qlorakit.data.dedup import exact_duplicates, jaccard, near_duplicates, normalise, shingles, words


def _clean_records(shared):
    """427 self-instruct tasks: no two of them share more than 15% of their 3-gram shingles."""
    out = []
    for name in ("self_instruct_user_oriented.jsonl", "self_instruct_seed_tasks.jsonl"):
        for r in read_records(shared / "instruction" / name):
            inst = r["instances"][0]
            out.append({"instruction": r["instruction"], "input": inst["input"], "output": inst["output"]})
    return out


def _perturb(text: str, rng: random.Random, n_edits: int) -> str:
    """Replace ``n_edits`` words with new ones."""
    words = text.split()
    for i in rng.sample(range(len(words)), min(n_edits, len(words))):
        words[i] = rng.choice(["alpha", "bravo", "charlie", "delta", "echo"])
    return " ".join(words)


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("Hello,   World!\n") == normalise("hello world") == "hello world"
    assert normalise("ﬁne") == "fine"  # NFKC folds the ligature


def test_near_duplicates_agree_with_brute_force(shared):
    recs = _clean_records(shared)[:120]
    rng = random.Random(3)
    texts = [r["instruction"] + " " + r["output"] for r in recs]
    texts += [_perturb(texts[i], rng, 2) for i in range(0, 120, 10) if len(texts[i].split()) > 40]
    sets = [shingles(t) for t in texts]
    brute = {(i, j) for i, j in itertools.combinations(range(len(texts)), 2) if jaccard(sets[i], sets[j]) >= 0.8}
    groups = near_duplicates(texts, 0.8)
    found = {(i, j) for g in groups for i, j in itertools.combinations(g.members, 2)}
    assert brute and brute <= found  # every truly similar pair is in one group
    for g in groups:  # and every group is held together by confirmed pairs
        assert all(any((min(a, b), max(a, b)) in brute for b in g.members if b != a) for a in g.members)


def test_clean_sample_has_no_duplicates(shared, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "clean.jsonl", _clean_records(shared))
    report = run_checks([load_source(path, licence="Apache-2.0")], CheckOptions(contamination=False))
    assert report.counts["records"] >= 300
    assert report.counts["exact_duplicate_groups"] == 0 and report.counts["near_duplicate_groups"] == 0


def test_planted_exact_and_near_duplicates_found(shared, tmp_path, write_jsonl):
    recs = _clean_records(shared)
    rng = random.Random(11)
    long_rows = [i for i, r in enumerate(recs) if len((r["instruction"] + " " + r["output"]).split()) >= 60]
    picks = rng.sample(long_rows, 10)
    planted_exact, planted_near = [], []
    for i in picks[:5]:  # exact copies, re-cased and re-spaced: equal after normalisation
        r = dict(recs[i])
        r["output"] = "  " + r["output"].upper().replace(" ", "  ") + " !"
        recs.append(r)
        planted_exact.append({i + 1, len(recs)})
    for i in picks[5:]:  # near copies: two words of the answer replaced
        r = dict(recs[i])
        r["output"] = _perturb(r["output"], rng, 2)
        recs.append(r)
        planted_near.append({i + 1, len(recs)})
    path = write_jsonl(tmp_path / "dups.jsonl", recs)
    report = run_checks([load_source(path, licence="Apache-2.0")], CheckOptions(contamination=False))
    groups = {"exact": [], "near": []}
    for f in report.findings:
        if f["check"] == "duplicates":
            groups[f["kind"]].append({m["row"] for m in f["members"]})
    assert sorted(map(sorted, groups["exact"])) == sorted(map(sorted, planted_exact))
    assert sorted(map(sorted, groups["near"])) == sorted(map(sorted, planted_near))


def test_duplicates_across_files(tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "the quick brown fox jumps over the lazy dog today"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "x y z"}, {"text": "The quick brown fox jumps over the lazy dog, today."}])
    report = run_checks([load_source(a, licence="MIT"), load_source(b, licence="MIT")], CheckOptions(contamination=False))
    (dup,) = [f for f in report.findings if f["check"] == "duplicates"]
    assert dup["kind"] == "exact"
    assert dup["members"] == [{"source": str(a), "row": 1}, {"source": str(b), "row": 2}]
    assert report.per_source[str(b)]["exact_duplicates"] == 1


def test_exact_duplicates_groups():
    groups = exact_duplicates(["A b", "c", "a B.", "c!", "d", ""])
    assert sorted(g.members for g in groups) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError):
        near_duplicates(["a"], 1.5)


# passages in scripts written without spaces between words (written for these tests): Chinese,
# Japanese and Thai
_UNSPACED = [
    "退货政策：商品在收到后三十天内可以退货，请保留原始包装和购物小票，我们会在五个工作日内处理退款。",
    "配送说明：订单通常在两个工作日内发货，偏远地区可能需要更长时间，请耐心等待我们的短信通知。",
    "会员积分：每消费一元可获得一个积分，积分可以在下次购物时抵扣现金，有效期为一年。",
    "ご注文の商品は通常二営業日以内に発送されます。離島など一部地域ではお届けに時間がかかる場合があります。",
    "会員登録をすると、ポイントが貯まり、次回のお買い物で一ポイント一円としてご利用いただけます。",
    "สินค้าสามารถคืนได้ภายในสามสิบวันหลังจากได้รับสินค้า กรุณาเก็บบรรจุภัณฑ์เดิมและใบเสร็จไว้เพื่อการคืนเงิน",
]


def _one_char_changed(text: str) -> str:
    """``text`` with the character two thirds of the way in replaced (by another of its characters)."""
    i = 2 * len(text) // 3
    other = next(c for c in text if c != text[i] and c.isalpha())
    return text[:i] + other + text[i + 1:]


def test_unspaced_scripts_split_into_characters():
    assert words("Order 42 发货了，café テキスト") == ["Order", "42", "发", "货", "了", "café", "テ", "キ", "ス", "ト"]
    # spacing between the characters of an unspaced script does not change the words
    assert normalise("退货 政策") == normalise("退货政策。") == "退 货 政 策"


def test_words_keep_their_combining_marks():
    # Python's re \w leaves out combining marks: Hindi words were cut at every vowel sign and virama,
    # which were dropped, so का, की, के, को (of, of, of, to) all read as क
    assert words("हिन्दी भाषा का की के को") == ["हिन्दी", "भाषा", "का", "की", "के", "को"]
    assert words("বাংলা ভাষায় লেখা, தமிழ் மொழி") == ["বাংলা", "ভাষায়", "লেখা", "தமிழ்", "மொழி"]
    assert words("ที่นี่") == ["ที่", "นี่"]  # a Thai character with its vowel and tone marks
    assert words("e\u0301te\u0301 x² 3.14") == ["e\u0301te\u0301", "x²", "3", "14"]  # decomposed accents, numerals
    # ASCII text takes a faster pattern: the same words as the general one
    from qlorakit.data.dedup import _WORD

    for text in ("Order #42: x_y don't -- e-mail@host.org\t(3.14)", "A\x00B\x7fC_9 __ 0x1F"):
        assert text.isascii() and words(text) == _WORD.findall(text) != []


def test_hindi_texts_differing_in_vowel_signs_are_not_duplicates():
    order = "आपका ऑर्डर कल भेजा गया था और यह तीन दिनों में आपके घर पहुँच जाएगा। कृपया ट्रैकिंग नंबर की जाँच करें।"
    # other words throughout (different vowel signs on the same consonants): an "exact duplicate" before
    other = "आपकी ऑर्डर कल भेजी गयी थी और यह तीन दिन में आपको घर पहुँचा जाएगी। कृपया ट्रैकिंग नंबर का जाँच करो।"
    spaced = order.replace("।", " । ").replace(" ", "  ")  # the same words, other spacing and punctuation
    assert normalise(order) != normalise(other)
    assert normalise(spaced) == normalise(order)
    groups = exact_duplicates([order, other, spaced])
    assert [(g.kind, g.members) for g in groups] == [("exact", [0, 2])]
    assert jaccard(shingles(order), shingles(other)) < 0.2
    edited = order.replace("तीन", "चार")  # one word changed: still a near duplicate
    assert [g.members for g in near_duplicates([order, other, edited], 0.7)] == [[0, 2]]


def test_near_duplicates_found_in_unspaced_scripts():
    # a run of Chinese text between two punctuation marks was one "word": two passages differing in
    # one character shared no 3-gram of such words, and no pair below was found
    texts = _UNSPACED + [_one_char_changed(t) for t in _UNSPACED]
    n = len(_UNSPACED)
    sets = [shingles(t) for t in texts]
    brute = {(i, j) for i, j in itertools.combinations(range(len(texts)), 2) if jaccard(sets[i], sets[j]) >= 0.8}
    assert brute == {(i, i + n) for i in range(n)}  # each passage with its edited copy, nothing else
    groups = near_duplicates(texts, 0.8)
    assert sorted(g.members for g in groups) == [[i, i + n] for i in range(n)]
    assert all(0.8 <= g.similarity < 1.0 for g in groups)
