"""Forgetting measured across the processes of a distributed job: 2 processes on CPU (gloo), started with
`torchrun --standalone --nproc_per_node 2` the way users start them, running tests/distributed_run.py;
the numbers compared with one process measuring the same weights.

`accelerate launch --cpu --num_processes 2` is not used: accelerate 1.16 starts one process for --cpu (its
multi-CPU launch goes through mpirun), and runs FSDP on GPUs only; docs/integrations.md says so."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from forgetscale.metric.shard import split
from forgetscale.store import Store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_run.py"
TIMEOUT = 150  # seconds: a hang fails the test instead of holding CI


def _launch(mode: str, out: Path, processes: int = 2) -> tuple[int, list[dict], float]:
    """(exit code, each rank's report, seconds) of `torchrun --standalone --nproc_per_node N` on the script."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(SCRIPT), mode, str(out)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.monotonic() - start
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert len(reports) == processes, proc.stderr[-3000:]
    return proc.returncode, reports, seconds


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def test_split_covers_every_block_once():
    for total in range(1, 12):
        for world in range(1, total + 1):
            shards = [split(total, world, rank, batch_size=2) for rank in range(world)]
            covered = [i for s in shards for i in range(s.start, s.stop)]
            assert covered == list(range(total))  # in order, none twice, none dropped
            assert max(s.stop - s.start for s in shards) - min(s.stop - s.start for s in shards) <= 1
            assert all(s.passes == math.ceil(max(t.stop - t.start for t in shards) / 2) for s in shards)


def test_sft_lora_under_ddp_equals_one_process(tmp_path):
    """TRL SFTTrainer + PEFT LoRA under DDP (2 ranks, 7 blocks: 4 + 3), TRL's default bf16: every rank gets
    the same numbers, equal to `forgetscale measure` on one process on the checkpoints the run saved (one
    measuring precision for both tools); logged and stored once."""
    from forgetscale.cli import main

    code, (r0, r1), _ = _launch("sft", tmp_path / "sft")
    assert code == 0 and "error" not in r0, r0
    assert r0["wrapped"] == "DistributedDataParallel"
    assert r0["bf16"] and r0["measuring_dtype"] == "None"  # trained under bf16 autocast, measured in fp32
    assert r0["blocks"] == [0, 4] and r1["blocks"] == [4, 7]  # each rank held its share of the reference
    assert r0["reference_rows"] + r1["reference_rows"] == r0["results"]["1"]["tokens"]
    assert r0["results"] == r1["results"]  # the same numbers on every rank, to the bit
    assert [e["step"] for e in r0["logged"]] == [1, 2, 3] and r1["logged"] == []  # logged by the main process
    with Store(tmp_path / "sft" / "run", create=False) as store:
        (run,) = store.runs()
        rows = {r["step"]: r for r in store.checkpoints()}
    assert sorted(rows) == [0, 1, 2, 3] and run["status"] == "finished"  # stored once, by the main process

    one = tmp_path / "one"
    assert main(["measure", "--base", "tiny-random-llama", "--trainer-output", str(tmp_path / "sft" / "sft"),
                 "--out", str(one), "--no-progress", "--set", "forgetting.max_tokens=224",
                 "--set", "train.context_length=32"]) == 0
    with Store(one, create=False) as store:
        single = {r["step"]: r for r in store.checkpoints()}
    assert sorted(single) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        got = r0["results"][str(step)]
        assert got["kl"] > 0
        for key, column in (("kl", "forget_kl"), ("ce", "forget_ce"), ("ce_hard", "forget_ce_hard"),
                            ("entropy", "base_entropy")):
            assert _close(got[key], single[step][column]), (step, key, got[key], single[step][column])
            assert _close(rows[step][column], single[step][column])


def test_callback_on_a_model_sharded_with_fsdp_equals_one_process(tmp_path):
    """LoRA on the tiny model sharded by fully_shard (FSDP2) over 2 ranks: the callback's numbers equal one
    process measuring the same (seeded) weights, intervals included."""
    from forgetscale.metric import ForgettingMeter
    from forgetscale.models import load_model
    from tests.distributed_run import LENGTH, MAX_TOKENS, seeded_lora

    code, (r0, r1), _ = _launch("fsdp", tmp_path / "fsdp")
    assert code == 0 and "error" not in r0, r0
    # the decoder layers stay sharded between forwards (the root keeps its own unsharded after one)
    assert r0["sharded"] and r0["dtensors"][0] >= r0["dtensors"][1] - 2 > 0, r0["dtensors"]
    assert r0["results"] == r1["results"]
    torch.set_num_threads(1)
    base = load_model("tiny-random-llama")
    model = seeded_lora(base.model)
    single = ForgettingMeter.build(model, base.tokenizer, max_tokens=MAX_TOKENS, block_length=LENGTH).measure(model)
    got = r0["results"]["1"]
    assert got["kl"] > 0 and got["blocks"] == single.blocks == 7 and got["tokens"] == single.tokens
    for key in ("kl", "ce", "ce_hard", "entropy", "nll"):
        assert _close(got[key], getattr(single, key)), (key, got[key], getattr(single, key))
    for key in ("kl_ci", "ce_ci"):
        assert all(_close(a, b) for a, b in zip(got[key], getattr(single, key), strict=True))


@pytest.mark.parametrize("mode, message", [
    ("mismatch", "forgetting: the processes hold different settings (rank 0 and rank 1: settings.max_tokens 224 vs 448)"),
    ("too-many", "forgetting: 2 processes but 1 forgetting blocks"),
])
def test_bad_input_is_one_error_on_every_rank_not_a_hang(mode, message, tmp_path):
    code, reports, seconds = _launch(mode, tmp_path / mode)
    assert code != 0 and seconds < TIMEOUT
    errors = [r.get("error", "") for r in reports]
    assert all(e.startswith(f"ConfigError: {message}") and "\n" not in e for e in errors), errors
    assert errors[0] == errors[1]


def test_measure_on_two_processes_equals_one(tmp_path, capfd):
    """`forgetscale measure --processes 2` (torchrun's launch, in the CLI) stores what one process stores, the
    held-out loss included; a folder holding other settings is one line, before any process starts, and exit 2."""
    from forgetscale.cli import main
    from forgetscale.models import load_model
    from tests.distributed_run import seeded_lora

    torch.set_num_threads(1)
    adapter = tmp_path / "lora"
    seeded_lora(load_model("tiny-random-llama").model).save_pretrained(adapter)
    common = ["measure", "--base", "tiny-random-llama", "--adapter", str(adapter), "--no-progress",
              "--data", "embedded:news", "--set", "finetune.heldout_max_tokens=160", "--set", "finetune.max_examples=40",
              "--set", "train.context_length=32", "--set", "train.threads=1"]
    assert main([*common, "--set", "forgetting.max_tokens=224", "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--set", "forgetting.max_tokens=224", "--out", str(tmp_path / "two"), "--processes", "2"]) == 0
    rows = {}
    for name in ("one", "two"):
        with Store(tmp_path / name, create=False) as store:
            rows[name] = {r["step"]: r for r in store.checkpoints()}
            assert len(store.runs()) == 1  # one writer
    assert sorted(rows["two"]) == [0, 1] and rows["two"][1]["forget_kl"] > 0 and rows["two"][1]["ft_loss"] > 0
    for column in ("forget_kl", "forget_ce", "forget_ce_hard", "base_entropy", "ft_loss", "ft_kl"):
        assert _close(rows["two"][1][column], rows["one"][1][column]), column
    capfd.readouterr()
    before = (tmp_path / "two" / "results.sqlite").read_bytes()
    assert main([*common, "--set", "forgetting.max_tokens=192", "--out", str(tmp_path / "two"), "--processes", "2"]) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("forgetscale: ")]
    assert lines == ["forgetscale: forgetting.max_tokens: differs from the measurements already stored in "
                     f"{tmp_path / 'two'}; use a new --out folder"], lines
    assert (tmp_path / "two" / "results.sqlite").read_bytes() == before
