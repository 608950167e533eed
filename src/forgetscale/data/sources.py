"""Reading records from a dataset spec: `embedded:<name>`, `hf:<hub id>`, or a local file.

Every source yields a list of dicts. Local files report problems with their line number; an embedded
chat set's records name their conversation (`_id`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from forgetscale.data import embedded, sharegpt
from forgetscale.errors import DataError, UnknownNameError, did_you_mean

# name -> loader(data cache folder, notes): records; a loader appends what a user should be told to notes
EMBEDDED_SETS = {
    "news": lambda cache, notes: [{"text": t} for t in embedded.news_articles()],
    "wikipedia": lambda cache, notes: [{"text": t} for t in embedded.wikipedia_articles(cache)],
    "harmbench": lambda cache, notes: [{"prompt": t} for t in embedded.harmbench_prompts()],
    "sharegpt": sharegpt.records,
}
# finetune.language: auto is English-only for these sources (their records mix languages), all records elsewhere
ENGLISH_BY_DEFAULT = frozenset({"embedded:sharegpt"})
HUB_SHORTHANDS = {"wikitext": ("wikitext", "wikitext-103-raw-v1")}
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def load_records(
    source: str, *, config: str | None = None, split: str = "train", cache_dir: Path | None = None,
    max_records: int | None = None, notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """All records of a source, as dicts (in the source's own order); an embedded set may add a line for the
    user to `notes` (the packaged ShareGPT file's cut-off conversation)."""
    if source.startswith("embedded:"):
        name = source.removeprefix("embedded:")
        if name not in EMBEDDED_SETS:
            raise UnknownNameError(did_you_mean("embedded dataset", name, list(EMBEDDED_SETS)))
        records = EMBEDDED_SETS[name](cache_dir, notes)
    elif source.startswith("hf:"):
        records = _hub_records(source.removeprefix("hf:"), config, split, max_records)
    else:
        records = _local_records(Path(source).expanduser())
    for number, record in enumerate(records, start=1):
        if "_line" not in record:
            record["_row"] = number  # its place in the source, for messages (a CSV's header not counted)
    if max_records is not None:
        records = records[:max_records]
    if not records:
        raise DataError(f"{source}: dataset is empty; point it at a file or split with records")
    return records


def _hub_records(name: str, config: str | None, split: str, max_records: int | None) -> list[dict[str, Any]]:
    if name in HUB_SHORTHANDS:
        name, default_config = HUB_SHORTHANDS[name]
        config = config or default_config
    from forgetscale.hub import hub_reachable

    if not hub_reachable():
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # only the local cache; no minute of retries
    try:
        import datasets

        ds_split = split if max_records is None else f"{split}[:{max_records}]"
        ds = datasets.load_dataset(name, config, split=ds_split)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds of error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"hf:{name}: cannot load split '{split}' ({first})") from None
    return [dict(row) for row in ds]


def _local_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a file")
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON at column {err.colno} ({err.msg.lower()}); fix "
                            "the file") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: must hold a list of records (objects), or {{\"data\": [...]}}")
        return data
    if path.suffix == ".txt":
        return [{"text": doc} for doc in split_text_documents(_read_text(path))]
    if path.suffix == ".parquet":
        return _read_parquet(path)
    import pandas as pd

    try:
        # every cell as text, an empty cell as "": a response "4." stays text, not the float 4.0
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001 - pandas' parser errors vary by engine
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {_first_line(err)})") from None
    return frame.to_dict(orient="records")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """Rows as plain Python values: a list column (chat `messages`) becomes lists of dicts, as a JSONL file
    gives (pandas would give numpy arrays). pyarrow is what `datasets` reads parquet with; reading it
    directly keeps local files out of the `datasets` cache."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: cannot read as parquet ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {err.start} of the line); save the file as "
                                "UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON at column {err.colno} ({err.msg.lower()}); each "
                                "line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object; got {type(record).__name__}")
            record["_line"] = lineno
            records.append(record)
    return records


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {err.start} of the file); save the file as UTF-8") from None


def split_text_documents(text: str) -> list[str]:
    """A .txt file holds documents separated by blank lines; with no blank line, one document per line."""
    if "\n\n" in text.strip():
        docs = [" ".join(block.split("\n")) for block in text.split("\n\n")]
    else:
        docs = text.splitlines()
    return [d.strip() for d in docs if d.strip()]


def record_where(source: str, record: dict[str, Any], index: int) -> str:
    """'<file>:<line>' for a local JSONL record, '<source> conversation <id>' for an embedded chat, else
    '<source> record <n>': its 1-based place in the source (a CSV's data rows, header not counted), not in
    the training split (`index`, the fallback)."""
    if "_line" in record:
        return f"{source}:{record['_line']}"
    if "_id" in record:
        return f"{source} conversation {record['_id']}"
    return f"{source} record {record.get('_row', index + 1)}"
