"""PII redaction: exact outputs per kind, checksum and range rejections, false positives on real code, speed."""

from __future__ import annotations

import random
import sysconfig
import time
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.pii import PIIRedactor, Span, find_pii, iban_ok, luhn_ok, redact
from lmforge.data.base_reader import Document

# A valid test card (Visa test range), an IBAN from the ISO example and a valid-range SSN.
VISA = "4111 1111 1111 1111"
IBAN_GB = "GB82 WEST 1234 5698 7654 32"


def red(text: str) -> str:
    return redact(text)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail jane.doe+news@example.co.uk today", "mail <EMAIL> today"),
        ("Call +44 20 7946 0958 now", "Call <PHONE> now"),
        ("office: (555) 123-4567.", "office: <PHONE>."),
        ("tel 555-123-4567 x204", "tel <PHONE>"),
        ("Tel: +32 (0)2 790 75 75", "Tel: <PHONE>"),
        ("reach me at 0341 8387176", "reach me at <PHONE>"),
        ("my phone is 780 6326", "my phone is <PHONE>"),
        ("416 60 039 office", "<PHONE> office"),
        ("order 780 6326 shipped", "order 780 6326 shipped"),  # no phone word: too weak a shape alone
        ("host 192.168.10.254 is down", "host <IP_ADDRESS> is down"),
        ("v6 2001:db8:85a3::8a2e:370:7334 up", "v6 <IP_ADDRESS> up"),
        (f"card {VISA} expires", "card <CREDIT_CARD> expires"),
        ("card 4111-1111-1111-1111.", "card <CREDIT_CARD>."),
        (f"pay to {IBAN_GB} please", "pay to <IBAN> please"),
        ("ssn 123-45-6789 on file", "ssn <US_SSN> on file"),
        ("key AKIAIOSFODNN7EXAMPL3 here", "key <SECRET> here"),
        ("token ghp_" + "a1B2" * 9 + " end", "token <SECRET> end"),
        ("slack xoxb-1234567890-abcdefghij done", "slack <SECRET> done"),
        ('api_key = "f9Q2xL7pZ0aK3mW8vR5t"', 'api_key = "<SECRET>"'),
        ('"client_secret": "Zx81kQ0pLm3Nv72bTr9w"', '"client_secret": "<SECRET>"'),
    ],
)
def test_exact_redaction(text: str, expected: str) -> None:
    assert red(text) == expected


def test_private_key_block() -> None:
    pem = (
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nMIIEpAIBAAKCAQEA0Z3VS5JJcds3\n"
        "xfn/ygWyF8PbnGy0AHB7==\n-----END RSA PRIVATE KEY-----"
    )
    assert red(f"key:\n{pem}\nafter") == "key:\n<SECRET>\nafter"


def test_luhn_rejection() -> None:
    assert luhn_ok("4111111111111111")
    assert not luhn_ok("4111111111111112")
    assert red("card 4111 1111 1111 1112 expires") == "card 4111 1111 1111 1112 expires"
    assert red("id 0000000000000000") == "id 0000000000000000"  # passes Luhn, but a placeholder


def test_iban_mod97_rejection() -> None:
    assert iban_ok(IBAN_GB) and iban_ok("de89370400440532013000")
    assert not iban_ok("GB83 WEST 1234 5698 7654 32")
    assert red("pay GB83 WEST 1234 5698 7654 32") == "pay GB83 WEST 1234 5698 7654 32"


@pytest.mark.parametrize("ssn", ["000-12-3456", "666-12-3456", "912-12-3456", "123-00-4567", "123-45-0000"])
def test_ssn_invalid_ranges(ssn: str) -> None:
    assert find_pii(f"ssn {ssn} on file") == []


def test_ipv4_out_of_range_and_ipv6() -> None:
    assert red("host 256.1.1.1 and 10.0.0.300") == "host 256.1.1.1 and 10.0.0.300"
    assert red("lo ::1 and fe80::1ff:fe23:4567:890a%") == "lo ::1 and <IP_ADDRESS>%"
    assert red("not 2001:db8::g1:2") == "not 2001:db8::g1:2"


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.7 and numpy 1.26.4 released",
        "version 7.1.4.34 of the firmware",
        "on 2024-03-15, 15/03/2024, 03.15.2024 and 12:30:45",
        "total 1234567890123 rows, id 987654321, 20240315",
        "pi is 3.14159265358979323, ratio 0.09999999999999995",
        "x = a[1:2:3]; std::vector<int> v; y = 1e-10",
        "19 20 21 22 23 24 25\n26 27 28 29 30 31",
        'assert str(t) == "0001-02-03 04:05:06"',
        "a = +4294967296  # 1 << 32",
        'bad = ["000.000.000.000", "016.016.016.016"]',
        'text = format(123456789, "n")',
    ],
)
def test_no_false_positive(text: str) -> None:
    assert find_pii(text) == []


def test_spans_sorted_and_disjoint() -> None:
    text = "a@b.io 4111111111111111 123-45-6789 call 555-123-4567 and 8.8.8.8"
    spans = find_pii(text)
    assert [s.kind for s in spans] == ["EMAIL", "CREDIT_CARD", "US_SSN", "PHONE", "IP_ADDRESS"]
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    assert spans[0] == Span(0, 6, "EMAIL")


def test_stdlib_code_has_almost_no_false_positives() -> None:
    # Ordinary code: numbers, hashes, constants. E-mail addresses (author lines) and IPs (ipaddress/socket docs)
    # are real instances of their kind; anything else found in the standard library is a false positive.
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse", "colorsys", "_pydecimal", "tarfile", "random", "statistics", "hashlib", "uuid", "zipfile"]
    counts: Counter[str] = Counter()
    for name in names:
        counts.update(s.kind for s in find_pii((root / f"{name}.py").read_text(encoding="utf-8")))
    false_positives = sum(n for kind, n in counts.items() if kind not in ("EMAIL", "IP_ADDRESS"))
    assert false_positives <= 1, counts
    assert counts["SECRET"] == 0


def test_redactor_filter_meta_counts() -> None:
    doc = Document(id="d", text="a@b.io, c@d.org, 123-45-6789", source="s", meta={"lang": "en"})
    out = PIIRedactor().apply(doc)
    assert out.text == "<EMAIL>, <EMAIL>, <US_SSN>"
    assert out.meta == {"lang": "en", "pii": {"EMAIL": 2, "US_SSN": 1}}
    assert doc.text.startswith("a@b.io")  # the input document is not modified
    clean = PIIRedactor().apply(Document(id="e", text="nothing here", source="s"))
    assert clean.text == "nothing here" and clean.meta["pii"] == {}
    assert PIIRedactor.name == "pii"


def test_pathological_input_is_fast() -> None:
    rng = random.Random(0)
    line = "".join(rng.choice("0123456789 -.:+()@") for _ in range(1_000_000))
    start = time.perf_counter()
    redact(line)
    redact("1" * 1_000_000)
    redact("-----BEGIN RSA PRIVATE KEY-----" * 30_000)
    assert time.perf_counter() - start < 2.0
