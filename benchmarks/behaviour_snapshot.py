"""Behaviour snapshot for refactors: run a tiny-model sweep with every method and one with every
mitigation arm (capability suites at two steps), fit, predict and report them, and write one JSON of
everything a user sees (stored rows, fit output, laws.json, report figures), with wall-clock fields
masked. Two snapshots from two versions of the code must be equal.

    PYTHONPATH=OLD/src python benchmarks/behaviour_snapshot.py --out /tmp/snap-old
    python benchmarks/behaviour_snapshot.py --out /tmp/snap-new
    python benchmarks/behaviour_snapshot.py --compare /tmp/snap-old/snapshot.json /tmp/snap-new/snapshot.json

An existing sweep folder (the demo) is snapshotted as it stands, its own laws.json and report, nothing re-run:
`--existing runs/demo`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

BASE = {
    "model": "tiny-random-llama",
    "finetune": {"dataset": "embedded:news", "heldout_max_tokens": 256, "max_examples": 60},
    "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": 256},
    "train": {"steps": 8, "checkpoints": [0, 2, 4, 6, 8], "batch_size": 2, "context_length": 32, "lr": 0.01,
              "eval_batch_size": 8, "threads": 1},
}
SWEEPS = {
    "methods": {
        "method": [{"name": "lora", "ranks": [2, 4, 8]}, {"name": "dora", "ranks": [2]}, {"name": "ia3"},
                   {"name": "top_layers", "k": 1}, {"name": "full", "lr": 0.001}],
        "evals": {"suites": ["choice", "samples", "safety"], "steps": [4, 8],
                  "safety": {"limit": 4, "max_new_tokens": 8}, "choice": {"limit": 4},
                  "samples": {"prompts": ["Hello there.", "Name a colour."], "max_new_tokens": 8}},
    },
    "arms": {
        "method": {"name": "lora", "ranks": [2, 4]},
        "mitigation": [{"name": "replay", "p": 0.5}, {"name": "self_replay", "p": 0.5, "samples": 4},
                       {"name": "kl", "lam": 1.0}, {"name": "l2sp", "lam": 0.1}, {"name": "ewc", "lam": 0.1},
                       {"name": "freeze", "layers": 1}, {"name": "scale", "s": [0.5]}],
    },
}
# columns whose values are clock readings or machine paths, not results
MASKED = {"created_at", "updated_at", "wall_s", "ts", "time", "timestamp", "created", "elapsed_s", "seconds",
          "cost", "fitted_at", "train_s"}


def cli(*args: str, cwd: Path, check: bool = True) -> str:
    """stdout of one verb; with check=False a failure is part of the snapshot (exit code and message)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "forgetscale", *args], cwd=cwd, env=env, text=True,
                          capture_output=True)
    if done.returncode != 0 and check:
        raise SystemExit(f"forgetscale {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()}"


def mask_text(text: str, run_dir: Path) -> str:
    text = text.replace(str(run_dir), "RUN_DIR")
    text = re.sub(r"\d+(\.\d+)? ?(s|min|ms)\b", "<time>", text)  # durations printed in output
    text = re.sub(r"(training cost |<td>)\d+\.\d\dx?( \(reuses control\))?(</td></tr>)", r"\1<cost>\3", text)
    text = re.sub(r"training cost \d+\.\d\dx", "training cost <cost>", text)
    text = re.sub(r"│ \d+\.\d\d( \(reuses)? +│$", "│ <cost> │", text, flags=re.M)  # fit's cost column
    text = re.sub(r"[\d.]+ GB available", "<free> GB available", text)
    return re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?", "<date>", text)


def mask_json(obj, run_dir: Path):
    if isinstance(obj, dict):
        return {k: ("<masked>" if k in MASKED else mask_json(v, run_dir)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask_json(v, run_dir) for v in obj]
    if isinstance(obj, str):
        return mask_text(obj, run_dir)
    return obj


def tables(db: Path, run_dir: Path) -> dict:
    con = sqlite3.connect(db)
    out = {}
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"):
        cur = con.execute(f"SELECT * FROM {name}")
        cols = [c[0] for c in cur.description]
        rows = [{c: ("<masked>" if c in MASKED else v) for c, v in zip(cols, row, strict=True)} for row in cur]
        for row in rows:  # JSON columns may hold clock fields too
            for c, v in row.items():
                if isinstance(v, str) and v[:1] in "[{":
                    try:
                        row[c] = mask_json(json.loads(v), run_dir)
                    except ValueError:
                        pass
        out[name] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return out


def figures(run_dir: Path) -> dict:
    found = {}
    for path in sorted(run_dir.rglob("*")):
        if path.suffix in (".png", ".svg") and path.is_file():
            data = path.read_bytes()
            if path.suffix == ".svg":
                data = re.sub(rb"<dc:date>.*?</dc:date>", b"", data)
            found[str(path.relative_to(run_dir))] = hashlib.sha256(data).hexdigest()[:16]
    return found


def stored(run_dir: Path) -> dict:
    """What a finished sweep folder holds (its own fit and report, as the demo wrote them), nothing re-run."""
    report = (run_dir / "report.html").read_text()
    report = re.sub(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+",
                    lambda m: "img:" + hashlib.sha256(m.group(0).encode()).hexdigest()[:16], report)
    return {"tables": tables(run_dir / "results.sqlite", run_dir),
            "laws_json": mask_json(json.loads((run_dir / "laws.json").read_text()), run_dir),
            "report_html": mask_text(report, run_dir), "figures": figures(run_dir)}


def snapshot(run_dir: Path, cwd: Path) -> dict:
    fit = cli("fit", str(run_dir), "--bootstrap", "50", cwd=cwd)
    laws = json.loads((run_dir / "laws.json").read_text())
    predict = cli("predict", str(run_dir), "--rank", "4", "--steps", "8", cwd=cwd, check=False)
    cli("report", str(run_dir), cwd=cwd)
    report = (run_dir / "report.html").read_text()
    report = re.sub(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+",
                    lambda m: "img:" + hashlib.sha256(m.group(0).encode()).hexdigest()[:16], report)
    return {"tables": tables(run_dir / "results.sqlite", run_dir), "fit_stdout": mask_text(fit, run_dir),
            "laws_json": mask_json(laws, run_dir), "predict_stdout": mask_text(predict, run_dir),
            "report_html": mask_text(report, run_dir), "figures": figures(run_dir)}


def compare(a: Path, b: Path) -> int:
    nowhere = Path("/nonexistent")  # masks again, so a snapshot taken before a mask was added still compares
    left, right = mask_json(json.loads(a.read_text()), nowhere), mask_json(json.loads(b.read_text()), nowhere)
    diffs = 0

    def walk(x, y, where: str) -> None:
        nonlocal diffs
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{where}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{where}[{i}]")
        elif isinstance(x, str) and isinstance(y, str) and "\n" in x + y and x != y:
            diffs += 1
            xl, yl = x.splitlines(), y.splitlines()
            first = next((i for i, (p, q) in enumerate(zip(xl, yl, strict=False)) if p != q), min(len(xl), len(yl)))
            p, q = (xl[first] if first < len(xl) else "<end>"), (yl[first] if first < len(yl) else "<end>")
            col = next((i for i, (u, v) in enumerate(zip(p, q, strict=False)) if u != v), min(len(p), len(q)))
            print(f"{where}: line {first + 1}, column {col + 1}:\n  - {p[max(0, col - 80):col + 80]}\n"
                  f"  + {q[max(0, col - 80):col + 80]}")
        elif x != y:
            diffs += 1
            if diffs <= 40:
                print(f"{where}: {str(x)[:200]} != {str(y)[:200]}")

    walk(left, right, "")
    print(f"{diffs} difference(s)" if diffs else "identical")
    return 1 if diffs else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for the sweeps and snapshot.json")
    ap.add_argument("--existing", type=Path, help="snapshot this finished sweep folder as it stands (no sweep, fit or report)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cwd = Path(__file__).resolve().parents[1]
    snap = {}
    if args.existing:
        snap["existing"] = stored(args.existing.resolve())
    else:
        for name, sections in SWEEPS.items():
            config = out / f"{name}.yaml"
            config.write_text(yaml.safe_dump({"name": name, **BASE, **sections}, sort_keys=False))
            shutil.rmtree(out / name, ignore_errors=True)
            cli("sweep", str(config), "--out", str(out / name), cwd=cwd)
            snap[name] = snapshot(out / name, cwd)
    (out / "snapshot.json").write_text(json.dumps(snap, indent=1, sort_keys=True, default=str))
    print(f"wrote {out / 'snapshot.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
