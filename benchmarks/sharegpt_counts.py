"""What the packaged ShareGPT file holds (`embedded:sharegpt`): conversations recovered from the cut-off
file, the clean-up, English share, refusal markers left in the replies, and how long a load takes
(parse + cache write, then from the cache). The numbers in docs/sweeps.md come from this script.

    python benchmarks/sharegpt_counts.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from forgetscale.data import sharegpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="data cache folder (default: a fresh temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        start = time.perf_counter()
        records, counts = sharegpt.load(cache)
        first = time.perf_counter() - start
        start = time.perf_counter()
        sharegpt.load(cache)
        again = time.perf_counter() - start
    c = counts
    print(f"file: {sharegpt.sharegpt_file()} ({c.file_bytes:,} bytes)")
    print(f"conversations: {c.complete:,} complete, {c.cut_off} cut off at the end ({c.cut_off_id}) and dropped")
    print(f"kept as chat records: {c.records:,} ({c.empty} empty, {c.no_reply} with no reply left)")
    print(f"turns in the file by role: {c.roles}")
    print(f"clean-up: {c.empty_turns} empty turns dropped, {c.joined_turns} joined to the turn before (same role), "
          f"{c.opening_replies:,} opening replies and {c.closing_requests} closing requests dropped")
    print(f"turns kept: {c.user_turns:,} user, {c.assistant_turns:,} assistant, {c.system_turns} system")
    print(f"English (data/language.py): {c.english:,} of {c.records:,} records ({100 * c.english / c.records:.1f}%)")
    print(f"refusal markers (evals/refusal.py) in assistant replies' openings: {c.refusal_replies:,} of "
          f"{c.assistant_turns:,} replies ({100 * c.refusal_replies / c.assistant_turns:.1f}%), in "
          f"{c.refusal_records:,} records; {c.english_refusal_replies:,} in English records; "
          f"{c.error_apologies:,} of them apologise for an earlier answer ('I apologize for the confusion')")
    print(f"most frequent markers: {c.refusal_markers}")
    replies = [m["content"].lower() for r in records for m in r["messages"] if m["role"] == "assistant"]
    print(f"anywhere in a reply: 'as an ai' {sum('as an ai' in t for t in replies)}, 'language model' "
          f"{sum('language model' in t for t in replies)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"load: {first:.1f} s parsing the file and writing the cache, {again:.1f} s from the cache; "
          f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
