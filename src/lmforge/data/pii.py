"""PII redaction: find personal data and secrets in text and replace each with a typed placeholder.

Kinds and their placeholders: `<EMAIL>`, `<PHONE>`, `<IP_ADDRESS>`, `<CREDIT_CARD>`, `<IBAN>`, `<US_SSN>` and
`<SECRET>` (cloud keys, tokens, private keys, high-entropy `api_key = "..."` assignments); optionally `<PERSON>`,
`<ORG>` and `<ADDRESS>` from a named-entity model (lmforge.data.pii_ner, `data.pii_ner`).

Each kind is a precompiled pattern that proposes candidates plus, where a checksum or structure exists, a
validator that rejects look-alikes (Luhn for cards, mod-97 for IBANs, `ipaddress` for IPs, the never-issued SSN
ranges). Every pattern is bounded (no nested unbounded repeats, lookbehinds that stop a scan from restarting inside
a run of the same characters), so the cost stays linear in the text length even on adversarial input.

Overlaps are resolved by kind priority (the order of `_DETECTORS`: the most specific, validated kinds first), then
by position; a lower-priority candidate that overlaps an accepted span is dropped. This is deterministic and lets a
checksum-validated card beat a phone-shaped reading of the same digits.

Phone numbers have no checksum, so they are matched in three tiers: international (`+CC ...`) and North American
formats with separators are taken on shape alone; national formats with a trunk `0` prefix need separators and 9-12
digits; any other digit group of 7-15 digits is taken only when a word such as "phone", "tel" or "call" precedes it.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Collection
from typing import NamedTuple

from lmforge.data.base_filter import Filter
from lmforge.data.base_reader import Document
from lmforge.data.pii_span import Span

log = logging.getLogger(__name__)


# ---- validators: each takes the matched string and says whether it is the real thing ----


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def luhn_ok(number: str) -> bool:
    """Luhn checksum over the digits of `number` (separators ignored)."""
    digits = _digits(number)
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return bool(digits) and total % 10 == 0


def _card_ok(s: str) -> bool:
    digits = _digits(s)
    groups = _CARD_SEPARATOR.split(s)
    # Printed cards group digits in fours (Amex 4-6-5, 19-digit 4-4-4-4-3); runs of one- or two-digit groups are
    # tables and calendars.
    if len(groups) > 1 and not all(3 <= len(g) <= 6 for g in groups):
        return False
    # A run of one repeated digit passes Luhn for some lengths but is a placeholder, never a card.
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


def iban_ok(s: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to 10..35, remainder mod 97 is 1."""
    compact = s.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ipv4_in_context_ok(text: str, m: re.Match[str]) -> bool:
    # Four-part version and section numbers ("version 7.1.4.34", "sections 8.2.4.44") are valid dotted quads;
    # a naming word just before is the only way to tell them apart.
    if _VERSION_CONTEXT.search(text, max(0, m.start() - _CONTEXT_WINDOW // 2), m.start()):
        return False
    return _ipv4_ok(m.group())


def _ipv4_ok(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)  # rejects octets > 255 and leading zeros (ambiguous octal)
    except ValueError:
        return False
    return True


def _ipv6_ok(s: str) -> bool:
    # Short forms such as "::1" or "a::b" are valid addresses but in code they are far more often slices and scope
    # operators than hosts; demanding three non-empty groups keeps those out.
    if sum(1 for g in s.split(":") if g) < 3:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _not_phone_shaped(s: str) -> bool:
    # One dot is a decimal number: dotted phone formats put it between every group ("01.84.17.61.18"). The
    # 3-2-4 dash shape is an SSN's; if the SSN check rejected it, it is not a phone either.
    return (
        s.count(".") == 1
        or _SSN_SHAPE.fullmatch(s) is not None
        or _DATE_PREFIX.match(s) is not None
        or _DOTTED_QUAD.fullmatch(s) is not None  # an IP rejected by the IP check (e.g. zero-padded octets)
    )


def _phone_digits_ok(s: str) -> bool:
    return not _not_phone_shaped(s) and 7 <= len(_digits(s.split("x")[0].split("ext")[0])) <= 15


def _ssn_ok(s: str) -> bool:
    # Area numbers 000, 666 and 900-999 are never issued; group 00 and serial 0000 are excluded by the pattern.
    return s[:3] != "000" and s[:3] != "666" and s[0] != "9"


def _national_phone_ok(s: str) -> bool:
    return not _not_phone_shaped(s) and 9 <= len(_digits(s)) <= 12


def shannon_entropy(s: str) -> float:
    """Bits per character of the character distribution of `s`."""
    counts = Counter(s)
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _secret_value_ok(s: str) -> bool:
    # Real keys mix letters and digits with high entropy; identifiers, dotted paths and words do not.
    has_digit = any(c.isdigit() for c in s)
    has_alpha = any(c.isalpha() for c in s)
    return has_digit and has_alpha and shannon_entropy(s) >= 3.5


# ---- patterns ----

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![\w-])"
)
# The body may hold single dashes (header lines such as "Proc-Type") but never "-----", so a BEGIN without an END
# stops at the next dash run instead of scanning on; the possessive repeat never backtracks.
_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[A-Za-z0-9+/=\s:,.]|-(?!----)){0,16384}+"
    r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----"
)
_AWS_KEY = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])")
_GITHUB_TOKEN = re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,240})(?!\w)")
_SLACK_TOKEN = re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,250}(?![A-Za-z0-9-])")
# The keyword may end an identifier (`stripe_api_key`, `DB_PASSWORD`); only the quoted value is reported, so the
# assignment stays readable after redaction.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|pwd|credential|private[_-]?key|access[_-]?key)\w{0,20}['\"]?"
    r"[ \t]{0,3}(?:=|:|:=|=>)[ \t]{0,3}['\"]([A-Za-z0-9+/_\-.=~]{16,200})['\"]"
)
_IBAN = re.compile(r"(?i)[A-Z](?<!\w[A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w])")
# Cards: 13-19 digits, single spaces or dashes allowed between digits; not glued to other digits or groups.
_CARD = re.compile(r"\d(?<![\w.-]\d)(?:[ -]?\d){12,18}(?![\w]|[.-]\d)")
_SSN = re.compile(r"\d(?<![\w-]\d)\d{2}-(?!00)\d{2}-(?!0000)\d{4}(?![\w]|-\d)")
_IPV4 = re.compile(r"\d(?<![\w.]\d)\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")
_PHONE_INTERNATIONAL = re.compile(
    r"(?<![\w+])(?:(?:\+|00)[1-9]\d{0,2}[ .-]?(?:\(0\)[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]\d{1,5}){1,5}"
    r"|\+[1-9]\d{8,14})(?:[ ]?(?:x|ext\.?)[ ]?\d{1,5})?(?![\w]|[.-]\d)"
)
_PHONE_NANP = re.compile(
    r"(?<![\w+.-])(?:(?:\+?1|001)[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
    r"(?:[ ]?(?:x|ext\.?)[ ]?\d{1,5})?(?![\w]|[.-]\d)"
)
_PHONE_NATIONAL = re.compile(r"(?<![\w+.-])(?:\(0\d{1,4}\)|0\d{1,4})(?:[ .-]\d{2,5}){1,4}(?![\w]|[.-]\d)")
_PHONE_WEAK = re.compile(r"[(\d](?<![\w+.-][(\d])\d{0,5}\)?(?:[ .-]?\d{2,5}){1,4}(?![\w]|[.-]\d)")
_PHONE_CONTEXT_BEFORE = re.compile(
    r"(?i)\b(?:phone|tel|telephone|mobile|cell|fax|call|contact|reach|whatsapp|sms|dial|ring|answer\w*"
    r"|messag\w*)\b"
)
# Directory-style listings label the number after it ("555 1234 office", "0123 4567-Fax").
_PHONE_CONTEXT_AFTER = re.compile(r"(?i)[\s,:;()\\-]{0,4}(?:office|fax|mobile|home|work|cell|phone|tel)\b")
_VERSION_CONTEXT = re.compile(r"(?i)\b(?:version|ver|v|release|build|section|sections|rfc)\W{0,3}$")
_SSN_SHAPE = re.compile(r"\d{3}-\d{2}-\d{4}")
# A date (with a four-digit year) at the start of a candidate: "2024-03-15", "15.03.2024 10:30".
_DATE_PREFIX = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}(?!\d)|\d{1,2}[-./]\d{1,2}[-./]\d{4}(?!\d)")
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){2,3}")
_CARD_SEPARATOR = re.compile(r"[ -]")
# A bare `+digits` after `=` or `return` is a signed integer literal in code, not a phone.
_SIGNED_LITERAL_CONTEXT = re.compile(r"(?:=|\breturn)\s*$")
_CONTEXT_WINDOW = 40


def _international_phone_ok(text: str, m: re.Match[str]) -> bool:
    if not _phone_digits_ok(m.group()):
        return False
    unseparated = m.group()[1:].isdigit()
    return not (unseparated and _SIGNED_LITERAL_CONTEXT.search(text, max(0, m.start() - 10), m.start()))


def _weak_phone_ok(text: str, m: re.Match[str]) -> bool:
    s = m.group()
    if not _phone_digits_ok(s):
        return False
    # An unseparated run shorter than a full national number is more often a count or an id than a phone.
    if s.isdigit() and len(s) < 10:
        return False
    if _PHONE_CONTEXT_BEFORE.search(text, max(0, m.start() - _CONTEXT_WINDOW), m.start()):
        return True
    return _PHONE_CONTEXT_AFTER.match(text, m.end()) is not None


class _Detector(NamedTuple):
    kind: str
    pattern: re.Pattern[str]
    # A cheap substring test: when none of these occur the pattern cannot match, so it is not run at all.
    needs: tuple[str, ...]
    validate: Callable[[str], bool] | None = None
    group: int = 0
    # Test `needs` against the lowercased text, for case-insensitive patterns.
    lowercase_needs: bool = False
    # Validators that need the surrounding text (context words) instead of only the match.
    validate_in_context: Callable[[str, re.Match[str]], bool] | None = None


_ANY_DIGIT = tuple("0123456789")

# Priority order: earlier kinds win overlaps.
_DETECTORS: tuple[_Detector, ...] = (
    _Detector("SECRET", _PEM, ("-----BEGIN",)),
    _Detector("SECRET", _AWS_KEY, ("AKIA", "ASIA")),
    _Detector("SECRET", _GITHUB_TOKEN, ("gh", "github_pat_")),
    _Detector("SECRET", _SLACK_TOKEN, ("xox",)),
    _Detector("SECRET", _SECRET_ASSIGNMENT, ("key", "secret", "token", "passw", "pwd", "credential"),
              _secret_value_ok, group=1, lowercase_needs=True),
    _Detector("EMAIL", _EMAIL, ("@",)),
    _Detector("IBAN", _IBAN, _ANY_DIGIT, iban_ok),
    _Detector("CREDIT_CARD", _CARD, _ANY_DIGIT, _card_ok),
    _Detector("US_SSN", _SSN, ("-",), _ssn_ok),
    _Detector("IP_ADDRESS", _IPV4, (".",), validate_in_context=_ipv4_in_context_ok),
    _Detector("IP_ADDRESS", _IPV6, (":",), _ipv6_ok),
    _Detector("PHONE", _PHONE_INTERNATIONAL, ("+", "00"), validate_in_context=_international_phone_ok),
    _Detector("PHONE", _PHONE_NANP, _ANY_DIGIT, _phone_digits_ok),
    _Detector("PHONE", _PHONE_NATIONAL, ("0",), _national_phone_ok),
    _Detector("PHONE", _PHONE_WEAK, _ANY_DIGIT, validate_in_context=_weak_phone_ok),
)


def _overlaps(accepted: list[Span], start: int, end: int) -> bool:
    """Whether `[start, end)` overlaps any span of `accepted`, which is sorted and non-overlapping."""
    # Spans are disjoint and sorted, so their ends are sorted too: find the first one ending after `start`.
    lo = bisect.bisect_right(accepted, start, key=lambda s: s.end)
    return lo < len(accepted) and accepted[lo].start < end


def find_pii(text: str, ner: Collection[str] = ()) -> list[Span]:
    """All PII spans in `text`, sorted by start and non-overlapping (higher-priority kinds win overlaps).

    `ner` names the model-found kinds to add (PERSON, ORG, ADDRESS; lmforge.data.pii_ner): they come after every
    pattern kind, so an e-mail or phone inside an address stays `<EMAIL>` / `<PHONE>`.
    """
    accepted: list[Span] = []
    lowered = text.lower()
    for det in _DETECTORS:
        haystack = lowered if det.lowercase_needs else text
        if not any(n in haystack for n in det.needs):
            continue
        for m in det.pattern.finditer(text):
            start, end = m.span(det.group)
            if det.validate is not None and not det.validate(m.group(det.group)):
                continue
            if det.validate_in_context is not None and not det.validate_in_context(text, m):
                continue
            if _overlaps(accepted, start, end):
                continue
            bisect.insort(accepted, Span(start, end, det.kind))
    if ner:
        from lmforge.data.pii_ner import find_entities

        accepted = sorted(accepted + find_entities(text, ner, taken=accepted))
    return accepted


def redact(text: str, ner: Collection[str] = ()) -> tuple[str, Counter[str]]:
    """`text` with every PII span replaced by `<KIND>`, and the count of spans redacted per kind."""
    spans = find_pii(text, ner)
    counts: Counter[str] = Counter(s.kind for s in spans)
    if not spans:
        return text, counts
    parts: list[str] = []
    pos = 0
    for span in spans:
        parts.append(text[pos : span.start])
        parts.append(f"<{span.kind}>")
        pos = span.end
    parts.append(text[pos:])
    return "".join(parts), counts


class PIIRedactor(Filter):
    """Replaces PII in each document with typed placeholders; never drops a document.

    The per-kind counts go to `meta["pii"]` (empty dict when nothing was found) so curation can report how much
    was scrubbed. `ner` adds the model-found kinds (PERSON, ORG, ADDRESS); the model loads on the first document.
    """

    name = "pii"

    def __init__(self, ner: Collection[str] = ()) -> None:
        self.ner = tuple(ner)

    def apply(self, doc: Document) -> Document:
        text, counts = redact(doc.text, self.ner)
        if counts:
            log.debug("%s: redacted %s", doc.id, dict(counts))
        return dataclasses.replace(doc, text=text, meta={**doc.meta, "pii": dict(sorted(counts.items()))})
