"""Personal data and secrets: planted values are all found at their rows, a clean sample gives nothing."""

from __future__ import annotations

import json
import random
import string

import pytest

from qlorakit.data import read_records
from qlorakit.data.check import CheckOptions, load_source, run_checks
from qlorakit.data.pii import find_pii, iban_ok, luhn_ok, redact


# ---- independent reference implementations ----


def luhn_check_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` pass Luhn (sum of digits of doubled alternates)."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # these are doubled once the check digit is appended
            d = sum(int(x) for x in str(d * 2))
        total += d
    return str((10 - total % 10) % 10)


def iban_with_check(country: str, bban: str) -> str:
    """ISO 13616: check digits = 98 - (BBAN + country + '00' as digits) mod 97."""
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


def test_luhn_matches_reference_and_published_test_numbers():
    for n in ("4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "3530111333300000"):
        assert luhn_ok(n)
    rng = random.Random(0)
    for _ in range(500):
        payload = "".join(rng.choice(string.digits) for _ in range(rng.randint(12, 18)))
        good = payload + luhn_check_digit(payload)
        assert luhn_ok(good)
        bad = payload + str((int(luhn_check_digit(payload)) + rng.randint(1, 9)) % 10)
        assert not luhn_ok(bad)


def test_iban_matches_reference_and_published_examples():
    for s in ("GB82WEST12345698765432", "DE89370400440532013000", "FR1420041010050500013M02606",
              "NL91ABNA0417164300", "CH9300762011623852957"):
        assert iban_ok(s)
    rng = random.Random(1)
    for _ in range(200):
        good = iban_with_check("DE", "".join(rng.choice(string.digits) for _ in range(18)))
        assert iban_ok(good)
        assert not iban_ok(good[:-1] + str((int(good[-1]) + 1) % 10))  # one digit changed
    assert not iban_ok("DE8937040044053201300")  # one character short for DE


# ---- planted values ----

RNG = random.Random(7)


def _card(prefix: str, length: int) -> str:
    payload = prefix + "".join(RNG.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return payload + luhn_check_digit(payload)


def _tok(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    while True:
        s = "".join(RNG.choice(alphabet) for _ in range(n))
        if any(c.isdigit() for c in s) and any(c.isalpha() for c in s):
            return s


VISA = _card("4", 16)
AMEX = _card("37", 15)
IBAN = iban_with_check("DE", "".join(RNG.choice(string.digits) for _ in range(18)))
PLANTED = [  # (kind, value, sentence)
    ("email", "maria.gonzalez84@gmail.com", "You can reach me at {} any time."),
    ("email", "j.smith@acme-corp.co.uk", "Forward the invoice to {} please."),
    ("phone", "+44 20 7946 0958", "My number is {} if you need it."),
    ("phone", "(312) 867-2209", "Call the office at {} tomorrow."),
    ("credit_card", " ".join(VISA[i:i + 4] for i in range(0, 16, 4)), "Charge my card {} for the order."),
    ("credit_card", AMEX, "The amex on file is {}."),
    ("iban", " ".join(IBAN[i:i + 4] for i in range(0, len(IBAN), 4)), "Please transfer it to {} by Friday."),
    ("ip_address", "81.2.69.160", "The login came from {} at noon."),
    ("secret", "AKIA" + _tok(16, string.ascii_uppercase + string.digits), "aws key {} leaked"),
    ("secret", "ghp_" + _tok(36), "token: {}"),
    ("secret", "sk-proj-" + _tok(40), "client = OpenAI(api_key=\"{}\")"),
    ("secret", "xoxb-" + "".join(RNG.choice(string.digits) for _ in range(12)) + "-" + _tok(24), "slack {}"),
    ("secret", "-----BEGIN RSA PRIVATE KEY-----", "{}\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"),
    ("secret", _tok(32), "config: api_key = '{}'"),
]
# look-alikes that must not be reported
DECOYS = [
    "Card number 4111 1111 1111 1112 fails the Luhn check.",
    f"The IBAN {IBAN[:-1]}{(int(IBAN[-1]) + 1) % 10} has a wrong check digit.",
    "Version 2.3.4.5 was released; 999.10.1.1 is not an address.",
    "Set api_key = 'YOUR_API_KEY_HERE' in the config file.",
    "Order 12345678 shipped on 2023-10-12 at 12:30:45, invoice 2021-0042.",
    "Write to help@shop.example.com or call 555-0142 (fictional).",
    "The router is at 192.168.1.1 and the loopback is 127.0.0.1.",
    "Clone it with git@github.com:org/repo.git and run it.",
]


def test_each_planted_value_is_found_alone():
    for kind, value, sentence in PLANTED:
        found = find_pii(sentence.format(value), placeholders=False)
        assert [(f.kind, f.value) for f in found] == [(kind, value)], sentence.format(value)


def test_decoys_are_not_reported():
    for text in DECOYS:
        assert find_pii(text, placeholders=False) == [], text


def test_placeholders_are_reported_as_such():
    found = find_pii(DECOYS[5] + " " + DECOYS[6])
    assert {(f.kind, f.placeholder) for f in found} == {("email", True), ("phone", True), ("ip_address", True)}


@pytest.fixture(scope="module")
def planted_file(shared, tmp_path_factory):
    """350 clean oasst1 records with the planted values and the decoys in known rows."""
    recs = [{"instruction": r["input"], "output": r["output"]}
            for r in read_records(shared / "instruction" / "oasst1_val_en.jsonl")][:350]
    rows = RNG.sample(range(len(recs)), len(PLANTED) + len(DECOYS))
    expected = {}
    for (kind, value, sentence), row in zip(PLANTED, rows):
        recs[row]["output"] += "\n" + sentence.format(value)
        expected[row + 1] = (kind, value)
    for text, row in zip(DECOYS, rows[len(PLANTED):]):
        recs[row]["instruction"] += " " + text
    path = tmp_path_factory.mktemp("pii") / "planted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path, expected


def test_clean_oasst_sample_has_no_pii(shared):
    src = load_source(shared / "instruction" / "oasst1_val_en.jsonl")
    assert len(src.examples) >= 300
    report = run_checks([src], CheckOptions(contamination=False))
    assert report.counts["pii_records"] == 0
    assert sum(report.counts["pii"].values()) == 0


def test_every_planted_value_found_at_its_row(planted_file):
    path, expected = planted_file
    report = run_checks([load_source(path, licence="Apache-2.0")], CheckOptions(contamination=False))
    found = {}
    for f in report.findings:
        if f["check"] == "pii" and f["severity"] != "info":
            for h in f["hits"]:
                found.setdefault(h["row"], []).append(f["kind"])
    assert found == {row: [kind] for row, (kind, _) in expected.items()}
    assert report.counts["pii"]["secret"] == sum(k == "secret" for k, _, _ in PLANTED)
    # the report never repeats the value itself
    assert not any(v in json.dumps(report.to_dict()) for _, v, _ in PLANTED if len(v) > 12)


def test_redacted_copy_has_no_pii_and_keeps_the_rest(planted_file, tmp_path):
    from qlorakit.data.cli import data_main

    path, expected = planted_file
    out = tmp_path / "masked.jsonl"
    assert data_main(["check", str(path), "--licence", "Apache-2.0", "--no-contamination", "--redact", str(out)]) == 0
    masked = read_records(out)
    original = read_records(path)
    assert len(masked) == len(original)
    text = out.read_text(encoding="utf-8")
    for _, value, _ in PLANTED:
        assert value not in text
    for row, (kind, _) in expected.items():
        assert f"[{kind.upper()}]" in masked[row - 1]["output"]
    assert "help@shop.example.com" in text  # placeholders stay
    again = run_checks([load_source(out, licence="Apache-2.0")], CheckOptions(contamination=False))
    assert again.counts["pii_records"] == 0
    untouched = [i for i in range(len(original)) if i + 1 not in expected]
    assert all(masked[i]["output"] == original[i]["output"] for i in untouched)


def test_redact_masks_inside_text():
    text, found = redact("mail maria.gonzalez84@gmail.com now")
    assert text == "mail [EMAIL] now" and len(found) == 1


def test_published_test_cards_fictional_numbers_and_versions_are_not_personal_data():
    def found(text):
        return [(m.kind, m.value, m.placeholder) for m in find_pii(text)]

    # the networks' test numbers are reported as placeholders (no one's card); a real-looking one is PII
    assert found("pay with 4242 4242 4242 4242") == [("credit_card", "4242 4242 4242 4242", True)]
    assert found("card 4556 7375 8689 9855") == [("credit_card", "4556 7375 8689 9855", False)]
    # a 555 number is fictional however it is written
    assert found("call 212-555-0123") == found("call 2125550123".replace("2125550123", "212-555-0123"))
    assert found("call 2125550123") == [("phone", "2125550123", True)]
    assert found("call 2125550123")[0][2] and not found("call 2125560123")[0][2]
    # dotted version and section numbers are not addresses; an address still is
    assert found("Chrome 120.0.0.0 on Windows") == [] and found("see section 1.2.3.4") == []
    assert found("server at 8.8.4.4") == [("ip_address", "8.8.4.4", False)]
