"""A cheap English test for `finetune.language: en` (the default for `embedded:sharegpt`).

A record is English unless its requests (a chat's user turns; else its text fields), first 2,000
characters, fail one of two tests:

- script: under 90% of the letters are ASCII (Chinese, Korean, Japanese, Cyrillic, Vietnamese, ...; an
  accented letter counts alone, so "série" is one non-ASCII letter of five);
- words: function words of Latin-script languages that are not English words (French "les", Spanish
  "para", German "und", Dutch "het", Italian "che", Portuguese "não", Indonesian "untuk", ...) number
  two or more and outnumber English function words ("the", "and", "is", "you", ...).

Code, numbers and a short English request pass: neither test fires without evidence. Words that are
also English, common in code or in names ("as", "do", "die", "con", "del", "em", "van", "los") are left
out of the foreign list. What it keeps of the ShareGPT records: docs/sweeps.md.
"""

from __future__ import annotations

import re
from typing import Any

SAMPLE_CHARS = 2000
MIN_ASCII_LETTERS = 0.9
_WORD = re.compile(r"[^\W\d_]+")
ENGLISH_WORDS = frozenset(
    "the a an and or of to in is are was be it that this for on with as you i your we can what how do not my me "
    "please have from".split())
OTHER_WORDS = frozenset((
    "le les des que qui pas sur avec vous nous je elle dans une "  # French
    "la de por para una como pero más "  # Spanish (la, de, que: also French, Portuguese, ...)
    "der das und ist nicht ein eine zu auf ich sie wir für dem sind "  # German
    "het een voor niet ik zijn wat ook maar hoe jij "  # Dutch
    "il che della sono gli questo "  # Italian
    "uma não "  # Portuguese
    "itu dengan untuk tidak saya"  # Indonesian
).split())


def looks_english(text: str) -> bool:
    words = _WORD.findall(text[:SAMPLE_CHARS])
    if not words:
        return True
    letters = "".join(words)
    if len(letters.encode("ascii", "ignore")) < MIN_ASCII_LETTERS * len(letters):
        return False
    lower = [w.lower() for w in words]
    english = sum(w in ENGLISH_WORDS for w in lower)
    other = sum(w in OTHER_WORDS for w in lower)
    return not (other >= 2 and other > english)


def record_text(record: dict[str, Any]) -> str:
    """What the language is judged on: a chat's user turns (all turns when it has none), else the record's
    text fields (metadata, `_`-prefixed, left out)."""
    messages = record.get("messages")
    if isinstance(messages, list):
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        asked = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return " ".join(c for c in (asked or contents) if isinstance(c, str))
    return " ".join(v for k, v in record.items() if isinstance(v, str) and not k.startswith("_"))


def english_record(record: dict[str, Any]) -> bool:
    return looks_english(record_text(record))
