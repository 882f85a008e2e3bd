"""Personal data and secrets in text: find them with checks that keep false alarms rare, and mask them.

Each detector pairs a pattern with a validation, so that a number is only a payment card when it
passes the Luhn check and has a card network's prefix, an IBAN only when its length fits its country
and its mod-97 check gives 1, an IP address only when every octet is in range, and a token only a
secret when it has a known key format, or follows ``api_key=`` / ``secret:`` and looks random.

Reserved and fictional values are not personal data: e-mail addresses at documentation domains
(RFC 2606/6761: ``example.com``, ``.example``, ``.test``, ``.invalid``, ``localhost``), North American
``555`` numbers (reserved for fiction), the card networks' published test numbers, and private,
loopback and documentation IP ranges (RFC 1918/5737). They are reported with ``placeholder=True`` (the kind of finding the packaged sample
data holds on purpose: a fictional shop's contact details); they count as information, not as PII,
and :func:`redact` leaves them in place.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["PiiMatch", "PII_KINDS", "find_pii", "redact", "redact_record", "luhn_ok", "iban_ok", "mask"]

PII_KINDS = ("email", "phone", "credit_card", "iban", "ip_address", "secret")


@dataclass(frozen=True)
class PiiMatch:
    kind: str  # one of PII_KINDS
    start: int
    end: int
    value: str
    detail: str = ""  # e.g. 'visa', 'aws_access_key', 'DE'
    placeholder: bool = False  # reserved/fictional: reported, not counted as PII, not redacted


def mask(value: str) -> str:
    """A preview that does not repeat the value: its first two characters and its length."""
    return f"{value[:2]}…({len(value)} chars)"


# --------------------------------------------------------------------------------------------
# checks


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check of payment card numbers."""
    if not digits.isdigit() or len(digits) < 2:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IBAN length per country (ISO 13616 registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_ok(iban: str) -> bool:
    """Country length and the ISO 7064 mod-97 check (the remainder must be 1)."""
    s = iban.replace(" ", "").upper()
    if len(s) != IBAN_LENGTHS.get(s[:2], -1) or not s[2:4].isdigit() or not s.isalnum():
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _card_network(d: str) -> str:
    n2, n3, n4, n6 = int(d[:2]), int(d[:3]), int(d[:4]), int(d[:6])
    if d[0] == "4" and len(d) in (13, 16, 19):
        return "visa"
    if (51 <= n2 <= 55 or 222100 <= n6 <= 272099) and len(d) == 16:
        return "mastercard"
    if n2 in (34, 37) and len(d) == 15:
        return "amex"
    if (n4 == 6011 or n2 == 65 or 644 <= n3 <= 649) and len(d) in (16, 19):
        return "discover"
    if 3528 <= n4 <= 3589 and 16 <= len(d) <= 19:
        return "jcb"
    if (300 <= n3 <= 305 or n2 in (36, 38)) and 14 <= len(d) <= 19:
        return "diners"
    if n2 == 62 and 16 <= len(d) <= 19:
        return "unionpay"
    if (n2 == 50 or 56 <= n2 <= 69) and 12 <= len(d) <= 19:
        return "maestro"
    return ""


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


# --------------------------------------------------------------------------------------------
# detectors: each yields PiiMatch for one text

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_RESERVED_DOMAINS = ("example.com", "example.org", "example.net", "example.edu")
_RESERVED_TLDS = ("example", "test", "invalid", "localhost", "local")
_SERVICE_LOCALS = {"git", "noreply", "no-reply", "donotreply", "do-not-reply", "mailer-daemon", "postmaster"}


def _emails(text: str) -> Iterator[PiiMatch]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        domain = m.group().rsplit("@", 1)[1].lower()
        local = m.group().rsplit("@", 1)[0].lower()
        reserved = (domain.rsplit(".", 1)[-1] in _RESERVED_TLDS
                    or any(domain == d or domain.endswith("." + d) for d in _RESERVED_DOMAINS))
        # git@github.com and noreply@ addresses name a service, not a person
        yield PiiMatch("email", m.start(), m.end(), m.group(), domain,
                       placeholder=reserved or local in _SERVICE_LOCALS)


# +CC then 2-5 groups; (AAA) BBB-CCCC; AAA-BBB-CCCC; 0AA BBBB BBBB; a bare run after a phone word
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"(?P<intl>\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){2,5})"
    r"|(?P<nanp>(?:1[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[.-])\d{3}[.-]\d{4})"
    r"|(?P<nanp_sp>(?:1 )?\(?\d{3}\)? \d{3} \d{4})"
    r"|(?P<natl>0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4})"
    r"|(?P<seven>\d{3}-\d{4})"
    r")(?![\w-]|\.\d)"
)
_PHONE_WORDS = re.compile(r"(?:phone|tel(?:ephone)?|mobile|cell|call|fax|whats ?app|sms|text me|ring)\b[^\n\d]{0,20}$",
                          re.IGNORECASE)
_BARE_DIGITS = re.compile(r"(?<![\w+.-])\d{7,15}(?![\w-]|\.\d)")


def _fictional_nanp(digits: str) -> bool:
    """A North American number (10 digits, or 11 with the country code 1) with the exchange 555,
    reserved for fiction."""
    nanp = digits[1:] if len(digits) == 11 and digits[0] == "1" else digits
    return len(nanp) == 10 and nanp[3:6] == "555"


def _phones(text: str) -> Iterator[PiiMatch]:
    for m in _PHONE.finditer(text):
        value = m.group()
        digits = re.sub(r"\D", "", value)
        kind = m.lastgroup or ""
        if kind == "intl" and not 8 <= len(digits) <= 15:
            continue
        if kind in ("nanp", "nanp_sp") and len(digits) not in (10, 11):
            continue
        if kind == "natl" and not 9 <= len(digits) <= 12:
            continue
        if kind in ("natl", "nanp_sp", "seven") and not _PHONE_WORDS.search(text[max(0, m.start() - 40):m.start()]):
            # formats that are also used for numbers of other kinds need a phone word before them
            if kind == "seven" and value.startswith("555-"):
                yield PiiMatch("phone", m.start(), m.end(), value, "fictional 555", placeholder=True)
            continue
        if len(set(digits)) == 1:
            continue
        nanp = digits if kind != "intl" or digits.startswith("1") else ""
        fictional = _fictional_nanp(nanp) or (kind == "seven" and value.startswith("555-"))
        yield PiiMatch("phone", m.start(), m.end(), value, kind, placeholder=fictional)
    for m in _BARE_DIGITS.finditer(text):
        if _PHONE_WORDS.search(text[max(0, m.start() - 40):m.start()]) and len(set(m.group())) > 1:
            if not (13 <= len(m.group()) <= 19 and luhn_ok(m.group()) and _card_network(m.group())):
                d = m.group()
                fictional = _fictional_nanp(d)
                yield PiiMatch("phone", m.start(), m.end(), d, "fictional 555" if fictional else "after a phone word",
                               placeholder=fictional)


_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){11,18}(?![\w]|[.-]\d)")


def _card_in(value: str) -> tuple[str, str] | None:
    """The card number ``value`` holds (``(printed, network)``), or None."""
    digits = re.sub(r"\D", "", value)
    if not 12 <= len(digits) <= 19 or not luhn_ok(digits):
        return None
    network = _card_network(digits)
    if not network:
        return None
    seps = set(re.sub(r"\d", "", value))
    if len(seps) > 1:
        return None
    if seps:  # printed in the usual groups: 4-4-4-4(-3), or 4-6-5 / 4-6-4 (amex, diners)
        groups = [len(g) for g in re.split(r"[ -]", value)]
        if not (all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4) and groups not in ([4, 6, 5], [4, 6, 4]):
            return None
    return value, network


# the networks' and payment processors' published test numbers: no one's card
TEST_CARDS = frozenset({
    "4111111111111111", "4242424242424242", "4012888888881881", "4000056655665556", "4000000000000002",
    "4222222222222", "5555555555554444", "5105105105105100", "5200828282828210", "2223003122003222",
    "378282246310005", "371449635398431", "378734493671000", "6011111111111117", "6011000990139424",
    "3530111333300000", "3566002020360505", "30569309025904", "38520000023237", "36227206271667",
    "6200000000000005",
})


def _cards(text: str) -> Iterator[PiiMatch]:
    for m in _CARD.finditer(text):
        value = m.group()
        # the run may have taken in a following number (an expiry, a code): try shorter group prefixes
        cuts = [len(value)] + [i for i in range(len(value) - 1, 0, -1) if value[i] in " -"]
        for cut in cuts:
            hit = _card_in(value[:cut])
            if hit is not None:
                test = re.sub(r"\D", "", hit[0]) in TEST_CARDS
                yield PiiMatch("credit_card", m.start(), m.start() + cut, hit[0],
                               f"{hit[1]} test number" if test else hit[1], placeholder=test)
                break


_IBAN = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30})")


def _ibans(text: str) -> Iterator[PiiMatch]:
    for m in _IBAN.finditer(text):
        cand = m.group(1)
        n = IBAN_LENGTHS.get(cand[:2])
        if n is None:
            continue
        # take exactly n alphanumerics (a following word may have been swallowed)
        count, end = 0, 0
        for i, ch in enumerate(cand):
            if ch != " ":
                count += 1
                if count == n:
                    end = i + 1
                    break
        if count < n:
            continue
        value = cand[:end]
        after = text[m.start() + end:m.start() + end + 1]
        if after.isalnum():
            continue
        if iban_ok(value):
            yield PiiMatch("iban", m.start(), m.start() + end, value, value[:2])


_IPV4 = re.compile(r"(?<![\w.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
# words after which four dotted numbers are a version or a section number, not an address
_VERSION_WORD = re.compile(r"(?:\bv|version|ver\.?|release|build|python|node|chrome|chromium|firefox|safari|edge|"
                           r"opera|section|sect\.|§|chapter|clause|article|art\.|figure|fig\.|table|paragraph|para\.|"
                           r"rule|item|step|no\.)\s*$", re.IGNORECASE)


def _ips(text: str) -> Iterator[PiiMatch]:
    if "." in text:
        for m in _IPV4.finditer(text):
            if any(len(g) > 1 and g[0] == "0" for g in m.groups()) or any(int(g) > 255 for g in m.groups()):
                continue
            if _VERSION_WORD.search(text[max(0, m.start() - 12):m.start()]):
                continue
            ip = ipaddress.IPv4Address(m.group())
            yield PiiMatch("ip_address", m.start(), m.end(), m.group(), "ipv4", placeholder=not ip.is_global)
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            try:
                ip6 = ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            if m.group().count(":") < 2 or len(m.group()) < 6:
                continue
            yield PiiMatch("ip_address", m.start(), m.end(), m.group(), "ipv6",
                           placeholder=not ip6.is_global or ip6 in ipaddress.IPv6Network("2001:db8::/32"))


# (name, substrings of which one must be present, pattern): the substring test skips most texts cheaply
_KEY_FORMATS: list[tuple[str, tuple[str, ...], re.Pattern[str]]] = [
    ("private_key", ("PRIVATE KEY",), re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("aws_access_key", ("AKIA", "ASIA", "ABIA", "ACCA"),
     re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?![A-Z0-9])")),
    ("github_token", ("gh", "github_pat_"),
     re.compile(r"(?<![\w])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{60,255})(?!\w)")),
    ("openai_key", ("sk-",),
     re.compile(r"(?<![\w-])sk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-)?[A-Za-z0-9_-]{20,}(?![\w-])")),
    ("slack_token", ("xox",), re.compile(r"(?<![\w-])xox[abposr]-[A-Za-z0-9-]{10,}(?![\w-])")),
    ("slack_webhook", ("hooks.slack.com",),
     re.compile(r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+")),
    ("google_api_key", ("AIza",), re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])")),
    ("stripe_key", ("_live_", "_test_"), re.compile(r"(?<![\w])(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}(?!\w)")),
    ("jwt", ("eyJ",), re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?![\w-])")),
    ("huggingface_token", ("hf_",), re.compile(r"(?<![\w])hf_[A-Za-z0-9]{34,}(?!\w)")),
]
_ASSIGNED_WORDS = ("key", "secret", "token", "passw")
_ASSIGNED = re.compile(
    r"(?i)(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|client[_-]?secret|"
    r"private[_-]?key|password|passwd|token)[\"']?\s*(?:[:=]|=>)\s*[\"']?([A-Za-z0-9_\-/+=.~]{16,200})"
)
_PLACEHOLDER_WORDS = re.compile(r"(?i)your|example|placeholder|changeme|xxxx|dummy|sample|redacted|insert|here|secret")


def _looks_random(s: str) -> bool:
    classes = sum(bool(re.search(p, s)) for p in (r"[a-z]", r"[A-Z]", r"\d"))
    return classes >= 2 and any(c.isdigit() for c in s) and _entropy(s) >= 3.5 and not _PLACEHOLDER_WORDS.search(s)


def _secrets(text: str) -> Iterator[PiiMatch]:
    spans: list[tuple[int, int]] = []
    for name, needles, rx in _KEY_FORMATS:
        if not any(n in text for n in needles):
            continue
        for m in rx.finditer(text):
            if name in ("openai_key", "slack_token") and not _looks_random(m.group().split("-", 1)[1]):
                continue
            spans.append((m.start(), m.end()))
            yield PiiMatch("secret", m.start(), m.end(), m.group(), name)
    lower = text.lower()
    if not any(w in lower for w in _ASSIGNED_WORDS):
        return
    for m in _ASSIGNED.finditer(text):
        s, e = m.span(1)
        if any(a <= s < b for a, b in spans) or not _looks_random(m.group(1)):
            continue
        yield PiiMatch("secret", s, e, m.group(1), "assigned " + m.group().split("=")[0].split(":")[0].strip(" \"'")[:20])


_DETECTORS = (_secrets, _emails, _ibans, _cards, _ips, _phones)


def find_pii(text: str, *, placeholders: bool = True) -> list[PiiMatch]:
    """Every piece of personal data or secret in ``text``, in order, without overlaps.

    Detectors run from the most specific (secrets, e-mail, IBAN, card) to the least (phone), and a
    later match that overlaps an earlier one is dropped: a card number is not also a phone number.
    ``placeholders=False`` leaves out reserved and fictional values.
    """
    found: list[PiiMatch] = []
    for det in _DETECTORS:
        for m in det(text):
            if any(m.start < f.end and f.start < m.end for f in found):
                continue
            found.append(m)
    if not placeholders:
        found = [f for f in found if not f.placeholder]
    return sorted(found, key=lambda f: f.start)


def redact(text: str) -> tuple[str, list[PiiMatch]]:
    """``text`` with every (non-placeholder) finding replaced by ``[KIND]``, and the findings."""
    matches = find_pii(text, placeholders=False)
    out, pos = [], 0
    for m in matches:
        out.append(text[pos:m.start])
        out.append(f"[{m.kind.upper()}]")
        pos = m.end
    out.append(text[pos:])
    return "".join(out), matches


def redact_record(value: Any) -> tuple[Any, int]:
    """A copy of a record (nested dicts and lists) with every string redacted; and the count masked."""
    if isinstance(value, str):
        new, found = redact(value)
        return new, len(found)
    if isinstance(value, dict):
        total, out = 0, {}
        for k, v in value.items():
            out[k], n = redact_record(v) if k != "_line" else (v, 0)
            total += n
        return out, total
    if isinstance(value, list):
        total, items = 0, []
        for v in value:
            nv, n = redact_record(v)
            items.append(nv)
            total += n
        return items, total
    return value, 0
