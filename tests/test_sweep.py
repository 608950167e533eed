"""End to end on the tiny random Llama: rows, resume after a kill, failures, config changes."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from forgetscale.config import parse_config
from forgetscale.errors import ConfigError
from forgetscale.methods import METHODS, LoraSpec, register_method
from forgetscale.methods.attach import ATTACH
from forgetscale.methods.lora import _attach_lora
from forgetscale.store import Store
from forgetscale.sweep import plan_runs, run_sweep

VALUE_COLUMNS = ("ft_loss", "ft_loss_train", "train_loss", "forget_ce", "forget_ce_hard", "base_entropy",
                 "forget_kl", "ft_kl", "tokens_seen")


def _values(store):
    return {(r["run_id"], r["step"]): tuple(r[c] for c in VALUE_COLUMNS) for r in store.checkpoints()}


def test_sweep_writes_every_checkpoint_of_every_run(tmp_path, tiny_cfg):
    cfg = parse_config(tiny_cfg())
    store = run_sweep(cfg, tmp_path, progress=False)
    runs = store.runs()
    assert [r["status"] for r in runs] == ["finished", "finished"]
    assert sorted(r["trainable_params"] for r in runs) == [2 * 2240, 4 * 2240]
    rows = store.checkpoints()
    assert len(rows) == 2 * 3
    for row in rows:
        assert row["base_entropy"] > 0
        assert abs(row["forget_ce"] - row["base_entropy"] - row["forget_kl"]) < 1e-6
        if row["step"] == 0:
            assert row["forget_kl"] == 0.0 and row["ft_kl"] == 0.0 and row["train_loss"] is None
        else:
            assert row["forget_kl"] > 0 and row["train_loss"] is not None
    # lr 0.01 on a random model: the fine-tuning loss must fall
    for run in runs:
        steps = store.checkpoints(run["run_id"])
        assert steps[-1]["ft_loss_train"] < steps[0]["ft_loss_train"]
        assert steps[-1]["tokens_seen"] == 4 * 2 * 32
    assert (tmp_path / "runs" / runs[0]["run_id"] / "adapter-step4" / "adapter_model.safetensors").is_file()
    # same config, same numbers (CPU determinism), and a finished sweep is not re-run
    again = run_sweep(cfg, tmp_path / "again", progress=False)
    assert _values(again) == _values(store)
    runs_before, rows_before, files_before = store.runs(), store.checkpoints(), _files(tmp_path / "runs")
    run_sweep(cfg, tmp_path, progress=False)
    rerun = Store(tmp_path)
    # nothing ran again: run rows keep their status and updated_at, checkpoint rows their wall_s, and no
    # adapter or log file is rewritten (a retrain would reproduce the numbers, not these)
    changed = (_changes("runs", runs_before, rerun.runs(), ("run_id",))
               + _changes("checkpoints", rows_before, rerun.checkpoints(), ("run_id", "step"))
               + _changes("files", [{"path": k, "sha256, mtime_ns": v} for k, v in files_before.items()],
                          [{"path": k, "sha256, mtime_ns": v} for k, v in _files(tmp_path / "runs").items()],
                          ("path",)))
    assert not changed, "re-running a finished sweep changed:\n" + "\n".join(changed)


def _changes(what, before, after, key):
    """'what key column: old -> new' for every value that differs, row added or row dropped."""
    old, new = ({tuple(r[k] for k in key): r for r in rows} for rows in (before, after))
    out = [f"{what} {k}: {'dropped' if k in old else 'added'}" for k in sorted(set(old) ^ set(new))]
    for k in sorted(set(old) & set(new)):
        out += [f"{what} {k} {c}: {old[k][c]!r} -> {new[k].get(c)!r}" for c in old[k] if old[k][c] != new[k].get(c)]
        out += [f"{what} {k} {c}: added" for c in new[k] if c not in old[k]]
    return out


def _files(folder):
    """Every file under a folder: its content hash and modification time (ns)."""
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _on_a_terminal(argv) -> str:
    """Run a command with stderr on a pseudo-terminal (as a user sees it); its stderr text."""
    import fcntl
    import pty
    import struct
    import termios

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=child_fd)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 1 << 16)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(main_fd)
    assert proc.wait() == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_killed_sweep_resumes_to_identical_rows(tmp_path, tiny_cfg, write_yaml):
    # a warm-up longer than the kill point: the resumed LR schedule must pick up where it stopped; one torch
    # thread in both processes (the reference runs in pytest's, whose thread count earlier tests may have set):
    # the same numbers are promised for the same config, and a thread count changes the sums' order
    data = tiny_cfg(method={"name": "lora", "ranks": [2]}, train={"steps": 12, "checkpoints": [0, 3, 6, 9, 12],
                                                                  "warmup_steps": 10, "threads": 1})
    config = write_yaml(data)
    reference = run_sweep(parse_config(data), tmp_path / "clean", progress=False)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "forgetscale", "sweep", str(config), "--out", str(killed), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (killed / "results.sqlite").exists():
            steps = [r["step"] for r in Store(killed).checkpoints()]
            if 6 in steps:
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = Store(killed).checkpoints()
    assert 0 < len(partial) < 5, "the kill must land mid-run"
    assert Store(killed).runs()[0]["status"] == "running"
    resume_at = max(r["step"] for r in partial)
    shown = [c for c in cmd if c != "--no-progress"]  # the resumed sweep's progress display, on a terminal
    stderr = _on_a_terminal(shown)
    assert "lr_scheduler.step()" not in stderr and "Warning" not in stderr, stderr
    assert "sweep: loading model tiny-random-llama" in stderr and "sweep: base predictions on" in stderr
    counts = re.findall(r"sweep: 1 runs: .*?(\d+)/12", stderr)  # labelled for the sweep, not the run
    assert counts and int(counts[0]) == resume_at and int(counts[-1]) == 12, stderr
    assert "lora-r2" in stderr and "checkpoint " in stderr  # the run and its phase, in the postfix
    resumed = Store(killed)
    assert resumed.runs()[0]["status"] == "finished"
    assert [r["step"] for r in resumed.checkpoints()] == [0, 3, 6, 9, 12]
    assert _values(resumed) == _values(reference)


def test_nonfinite_loss_fails_the_run_and_the_sweep_goes_on(tmp_path, tiny_cfg):
    class NanSpec(LoraSpec):
        name: str = "nan_lora"

    def attach_nan(model, spec, rank):
        peft_model = _attach_lora(model, spec, rank)
        peft_model.register_forward_hook(lambda mod, args, out: out if not mod.training else
                                         type(out)(logits=out.logits * float("nan")))  # the loss comes from these
        return peft_model

    register_method(NanSpec, attach=attach_nan)
    try:
        cfg = parse_config(tiny_cfg(method=[{"name": "nan_lora", "ranks": [2]}, {"name": "lora", "ranks": [2]}]))
        store = run_sweep(cfg, tmp_path, progress=False)
    finally:
        METHODS._items.pop("nan_lora")
        ATTACH._items.pop("nan_lora")
    status = {r["method"]: r for r in store.runs()}
    assert status["nan_lora"]["status"] == "failed"
    assert "non-finite training loss" in status["nan_lora"]["error"] and "step 1" in status["nan_lora"]["error"]
    assert status["lora"]["status"] == "finished"


def test_a_run_dir_holds_one_sweep(tmp_path, tiny_cfg):
    run_sweep(parse_config(tiny_cfg(method={"name": "lora", "ranks": [2]})), tmp_path, progress=False)
    rows = len(Store(tmp_path).checkpoints())
    with pytest.raises(ConfigError, match="train.lr: differs from the sweep already stored"):
        run_sweep(parse_config(tiny_cfg(method={"name": "lora", "ranks": [2]}, train={"lr": 0.5})), tmp_path)
    assert len(Store(tmp_path).checkpoints()) == rows  # nothing already written is lost
    # adding a rank extends the sweep
    cfg = parse_config(tiny_cfg(method={"name": "lora", "ranks": [2, 3]}))
    store = run_sweep(cfg, tmp_path, progress=False)
    assert len(store.runs()) == 2 and len(plan_runs(cfg)) == 2


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_lora_step0_is_measured_once_and_equals_each_runs_own(tmp_path, tiny_cfg, monkeypatch, dtype):
    """LoRA starts as the base to the bit (B = 0), so a sweep measures step 0 once and every rank shares it;
    a rank run alone, in a fresh sweep context, measures the same row itself. DoRA measures its own."""
    from forgetscale import train

    calls = []
    original = train.checkpoint_metrics
    monkeypatch.setattr(train, "checkpoint_metrics", lambda model, ctx: calls.append(1) or original(model, ctx))
    extra = {"train": {"dtype": dtype}, "model": {"name": "tiny-random-llama", "dtype": dtype}} if dtype else {}
    methods = [{"name": "lora", "ranks": [1, 2, 4]}, {"name": "dora", "ranks": [2]}]
    store = run_sweep(parse_config(tiny_cfg(method=methods, **extra)), tmp_path / "all", progress=False)
    assert len(calls) == 4 * 3 - 2  # lora ranks 2 and 4 reuse rank 1's step 0
    step0 = {r["run_id"]: tuple(r[c] for c in VALUE_COLUMNS[:-1]) for r in store.checkpoints() if r["step"] == 0}
    lora = {r["run_id"] for r in store.runs() if r["method"] == "lora"}
    for rank in (2, 4):
        alone = run_sweep(parse_config(tiny_cfg(method={"name": "lora", "ranks": [rank]}, **extra)),
                          tmp_path / f"r{rank}", progress=False)
        (row,) = [r for r in alone.checkpoints() if r["step"] == 0]
        assert tuple(row[c] for c in VALUE_COLUMNS[:-1]) == step0[row["run_id"]]
        assert row["run_id"] in lora
