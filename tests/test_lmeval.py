"""The lm-evaluation-harness bridge: a local multiple-choice task (tests/data/lmeval, 8 items) on the tiny
model's base and two LoRA adapters gives stored rows that equal lm-eval's own results for the same models,
loaded by lm-eval itself; bad input is one line, exit 2, nothing stored lost (real model: test_evals_real)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from forgetscale.cli import main
from forgetscale.store import Store

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "lmeval"
TASK = "forgetscale_mini"
SET = ["--set", f"lm-eval.include_path={TASKS}"]


@pytest.fixture(scope="module")
def lm_sweep(tmp_path_factory):
    import yaml

    from tests.conftest import tiny_config

    out = tmp_path_factory.mktemp("lmeval")
    path = out / "sweep.yaml"
    evals = {"batch_size": 4, "suites": [f"lm-eval:{TASK}"], "lm-eval": {"include_path": str(TASKS)}}
    path.write_text(yaml.safe_dump(tiny_config(method={"name": "lora", "ranks": [2, 4]}, evals=evals)))
    # the sweep runs the task once training is done (evals.suites), as `forgetscale eval` would
    assert main(["sweep", str(path), "--out", str(out / "run"), "--no-progress"]) == 0
    assert len({r["model_key"] for r in Store(out / "run").eval_items(f"lm-eval:{TASK}")}) == 3
    return out / "run"


def test_stored_rows_equal_lm_evals_own_results(lm_sweep, capsys):
    from lm_eval import simple_evaluate

    from forgetscale.evals.lmeval import task_manager
    from forgetscale.models import TINY, resolve_source

    assert main(["eval", str(lm_sweep), "--suite", f"lm-eval:{TASK}", *SET, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"eval: lm-eval:{TASK}" in printed and "agreement_with_base" in printed
    store = Store(lm_sweep)
    suite = f"lm-eval:{TASK}"
    summaries = {(s["model_key"], s["protocol"], s["metric"]): s for s in store.eval_summaries(suite)}
    items = store.eval_items(suite)
    keys = {r["model_key"] for r in items}
    assert len(keys) == 3 and "base" in keys  # base + lora r2 + lora r4, each at its last step
    runs = {r["run_id"]: r for r in store.runs()}
    source = resolve_source(TINY)[0]
    for key in sorted(keys):
        args = {"pretrained": source, "device": "cpu", "dtype": "float32", "batch_size": 4}
        if key != "base":
            run_id, step = key.split("@")
            args["peft"] = str(lm_sweep / "runs" / run_id / f"adapter-step{step}")
            assert runs[run_id]["method"] == "lora"
        # lm-eval loads the model and the adapter itself: an independent path to the same numbers
        own = simple_evaluate(model="hf", model_args=args, tasks=[TASK], task_manager=task_manager(str(TASKS), TASK),
                              bootstrap_iters=0, log_samples=True)
        for metric in ("acc", "acc_norm"):
            stored = summaries[(key, metric, "accuracy")]
            assert stored["n"] == 8
            assert stored["value"] == pytest.approx(own["results"][TASK][f"{metric},none"], abs=1e-12)
            per_doc = {str(s["doc_id"]): int(s[metric]) for s in own["samples"][TASK]}
            assert {r["item_id"]: r["correct"] for r in items if r["model_key"] == key and r["protocol"] == metric} \
                == per_doc
        if key != "base":
            s = summaries[(key, "acc", "accuracy")]
            assert s["vs_base_lo"] <= s["vs_base"] <= s["vs_base_hi"]
            agree = summaries[(key, "acc", "agreement_with_base")]
            mine = {r["item_id"]: r["prediction"] for r in items if r["model_key"] == key and r["protocol"] == "acc"}
            base = {r["item_id"]: r["prediction"] for r in items if r["model_key"] == "base" and r["protocol"] == "acc"}
            assert agree["k"] == sum(mine[i] == base[i] for i in base) and agree["n"] == 8
    from forgetscale.report import build_report

    page = build_report(lm_sweep)[0].read_text()
    assert f"lm-eval:{TASK}" in page and "agreement_with_base" in page  # the report's lm-eval section
    # the same settings again: nothing re-evaluated, the stored rows unchanged
    before = sorted((r["model_key"], r["protocol"], r["item_id"], r["output"]) for r in items)
    assert main(["eval", str(lm_sweep), "--suite", f"lm-eval:{TASK}", *SET, "--no-progress"]) == 0
    assert sorted((r["model_key"], r["protocol"], r["item_id"], r["output"])
                  for r in Store(lm_sweep).eval_items(suite)) == before


def _store_snapshot(run_dir: Path) -> tuple:
    store = Store(run_dir)
    return (sorted(map(str, store.eval_items())), sorted(str(s) for s in store.eval_summaries()),
            sorted(map(str, store.checkpoints())))


def test_unknown_task_is_one_line_with_did_you_mean(lm_sweep, capsys):
    before = _store_snapshot(lm_sweep)
    assert main(["eval", str(lm_sweep), "--suite", "lm-eval:forgetscale_mnii", *SET, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'forgetscale_mini'" in err and "lm-eval task" in err
    assert main(["eval", str(lm_sweep), "--suite", "lm-eval:arc_easyy", "--no-progress"]) == 2
    assert "did you mean 'arc_easy'" in capsys.readouterr().err  # lm-eval's own task list
    assert main(["eval", str(lm_sweep), "--suite", "lm-eval:" + TASK, "--set", "lm-eval.include_path=/nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lm-eval.include_path" in err
    assert _store_snapshot(lm_sweep) == before


def test_sweep_checks_lm_eval_tasks_before_training(tmp_path, write_yaml, tiny_cfg, capsys):
    path = write_yaml(tiny_cfg(evals={"suites": ["lm-eval:forgetscale_mnii"], "lm-eval": {"include_path": str(TASKS)}}))
    assert main(["sweep", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "did you mean 'forgetscale_mini'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.sqlite").exists()  # refused before anything was trained


def test_missing_extra_is_one_line_naming_it(lm_sweep):
    """lm-eval absent (its import blocked in a fresh interpreter): one line naming the extra, exit 2."""
    before = _store_snapshot(lm_sweep)
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'lm_eval' or name.startswith('lm_eval.'):\n"
            "            raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from forgetscale.cli import main\n"
            f"sys.exit(main(['eval', {str(lm_sweep)!r}, '--suite', 'lm-eval:{TASK}', '--no-progress']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "pip install 'forgetscale[lmeval]'" in done.stderr
    assert _store_snapshot(lm_sweep) == before
