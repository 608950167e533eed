"""`forgetscale measure`, the notebook API (forgetscale.metric.ForgettingMeter) and the Trainer / TRL callback
(forgetscale.integrations.ForgettingCallback), on the tiny random Llama; one slow test on SmolLM2.

These are also the worked examples of docs/integrations.md: an adapter folder, the callback, a checkpoints
folder."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from forgetscale.cli import main
from forgetscale.store import Store
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = "tiny-random-llama"
FORGET = ["--set", "forgetting.max_tokens=256", "--set", "train.context_length=32"]


def _base():
    from forgetscale.models import load_model

    return load_model(TINY)


def _lora(model, r=4, targets=("q_proj", "v_proj"), seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    tuned = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return tuned


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """An adapter made with plain PEFT, outside forgetscale."""
    path = tmp_path_factory.mktemp("peft") / "my-lora"
    _lora(_base().model).save_pretrained(path)
    return path


def _rows(run_dir: Path) -> list[dict]:
    with Store(run_dir, create=False) as store:
        return store.checkpoints()


def _runs(run_dir: Path) -> list[dict]:
    with Store(run_dir, create=False) as store:
        return store.runs()


def _tiny_blocks(tokenizer, max_tokens=256, length=32):
    from forgetscale.config import ForgettingConfig
    from forgetscale.data import build_forgetting_blocks
    from forgetscale.models import cache_root

    cfg = ForgettingConfig(dataset="embedded:wikipedia", max_tokens=max_tokens)
    return build_forgetting_blocks(cfg, tokenizer, length, cache_root() / "data")


# -- example 1: a PEFT adapter folder --------------------------------------------------------------
def test_measured_adapter_equals_direct_forgetting_measure(adapter_dir, tmp_path, capsys):
    from peft import PeftModel

    from forgetscale.metric.references import memory_reference
    from forgetscale.metric.sums import score

    out = tmp_path / "run"
    assert main(["measure", "--base", TINY, "--adapter", str(adapter_dir), "--out", str(out), "--no-progress",
                 *FORGET]) == 0
    printed = capsys.readouterr().out
    assert "base entropy" in printed and "KL" in printed and "[" in printed  # numbers with intervals
    rows = {r["step"]: r for r in _rows(out)}
    assert sorted(rows) == [0, 1]  # no trainer_state, no digits in the name: step 1
    assert rows[0]["forget_kl"] == 0.0

    base = _base()
    blocks = _tiny_blocks(base.tokenizer)
    ref = memory_reference(base.model, blocks, 8, torch.device("cpu"))
    tuned = PeftModel.from_pretrained(base.model, adapter_dir)
    direct = score(tuned, blocks, 8, torch.device("cpu"), None, ref)
    assert rows[1]["forget_kl"] == pytest.approx(direct["kl"], abs=1e-9)
    assert rows[1]["forget_ce"] == pytest.approx(direct["ce"], abs=1e-9)
    assert rows[1]["forget_ce_hard"] == pytest.approx(direct["ce_hard"], abs=1e-9)
    run = _runs(out)[0]
    assert run["method"] == "lora" and run["rank"] == 4 and run["status"] == "finished"
    n_lora = sum(p.numel() for n, p in tuned.named_parameters() if "lora_" in n)
    assert run["trainable_params"] == n_lora
    # the adapter is where eval expects it
    assert (out / "runs" / run["run_id"] / "adapter-step1" / "adapter_config.json").is_file()

    # re-running measures nothing and stores nothing new
    before = _rows(out)
    assert main(["measure", "--base", TINY, "--adapter", str(adapter_dir), "--out", str(out), "--no-progress",
                 *FORGET]) == 0
    assert _rows(out) == before


def test_notebook_api_matches_the_cli(adapter_dir, tmp_path):
    from peft import PeftModel

    from forgetscale.metric import ForgettingMeter

    base = _base()
    ref = ForgettingMeter.build(base.model, base.tokenizer, forgetting="embedded:wikipedia", max_tokens=256,
                              block_length=32)
    result = ref.measure(PeftModel.from_pretrained(base.model, adapter_dir))
    assert result.blocks == len(ref.blocks) and result.tokens == ref.ref.tokens
    lo, hi = result.kl_ci
    assert lo < result.kl < hi
    assert result.entropy == pytest.approx(result.ce - result.kl, abs=1e-9)
    out = tmp_path / "run"
    assert main(["measure", "--base", TINY, "--adapter", str(adapter_dir), "--out", str(out), "--no-progress",
                 *FORGET]) == 0
    assert _rows(out)[1]["forget_kl"] == pytest.approx(result.kl, abs=1e-9)


def test_measured_sweep_adapter_equals_the_sweep_row(tmp_path, write_yaml):
    from forgetscale.config import parse_config
    from forgetscale.sweep import run_sweep

    data = tiny_config(method={"name": "lora", "ranks": [4]}, train={"save_adapters": "all"})
    sweep_dir = tmp_path / "sweep"
    run_sweep(parse_config(data), sweep_dir, progress=False)
    with Store(sweep_dir, create=False) as store:
        (run,) = store.runs()
        stored = {r["step"]: r for r in store.checkpoints(run["run_id"])}
    adapter = sweep_dir / "runs" / run["run_id"] / "adapter-step4"
    out = tmp_path / "measured"
    config = write_yaml(data)
    assert main(["measure", "--base", TINY, "--config", str(config), "--data", "embedded:news",
                 "--adapter", str(adapter), "--out", str(out), "--no-progress"]) == 0
    rows = {r["step"]: r for r in _rows(out)}
    assert sorted(rows) == [0, 4]  # the step is read from the folder name
    for key in ("forget_kl", "forget_ce", "forget_ce_hard", "ft_loss", "ft_kl"):
        assert rows[4][key] == pytest.approx(stored[4][key], abs=1e-5), key
    assert rows[0]["ft_loss"] == pytest.approx(stored[0]["ft_loss"], abs=1e-5)
    (measured,) = _runs(out)
    assert measured["trainable_params"] == run["trainable_params"]
    assert measured["method"] == "lora" and measured["rank"] == 4


def test_full_checkpoint_is_measured_and_evaluable(tmp_path):
    from forgetscale.metric.references import memory_reference
    from forgetscale.metric.sums import score

    tuned = _base()
    torch.manual_seed(3)
    with torch.no_grad():
        tuned.model.model.layers[0].mlp.down_proj.weight.add_(0.05 * torch.randn_like(
            tuned.model.model.layers[0].mlp.down_proj.weight))
    tuned.model.save_pretrained(tmp_path / "full-ft")
    out = tmp_path / "run"
    assert main(["measure", "--base", TINY, "--model", str(tmp_path / "full-ft"), "--out", str(out), "--no-progress",
                 *FORGET]) == 0
    rows = {r["step"]: r for r in _rows(out)}
    base = _base()
    blocks = _tiny_blocks(base.tokenizer)
    direct = score(tuned.model, blocks, 8, torch.device("cpu"), None, memory_reference(base.model, blocks, 8,
                                                                                   torch.device("cpu")))
    assert rows[1]["forget_kl"] == pytest.approx(direct["kl"], abs=1e-9) and direct["kl"] > 0
    (run,) = _runs(out)
    assert run["method"] == "full" and run["rank"] is None
    assert run["trainable_params"] == sum(p.numel() for p in base.model.parameters())
    assert main(["eval", str(out), "--suite", "choice", "--no-progress", "--set", "choice.limit=2",
                 "--set", "choice.max_new_tokens=2", "--set", "batch_size=2"]) == 0


# -- example 3: a Trainer output folder with checkpoints ------------------------------------------
def _lm_dataset(tokenizer, n=16, length=32):
    from forgetscale.data.embedded import news_articles

    texts = news_articles()[:40]
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"][: n * length]
    ids = torch.tensor(ids).view(n, length)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]


def _args(out: Path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def test_trainer_output_gives_one_row_per_checkpoint(tmp_path):
    from transformers import Trainer

    base = _base()
    trainer_out = tmp_path / "trainer"
    model = _lora(base.model)
    data = _lm_dataset(base.tokenizer)
    trainer = Trainer(model=model, args=_args(trainer_out, save_strategy="steps", save_steps=2,
                                              eval_strategy="steps", eval_steps=2),
                      train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    assert sorted(p.name for p in trainer_out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    out = tmp_path / "run"
    assert main(["measure", "--base", TINY, "--trainer-output", str(trainer_out), "--out", str(out),
                 "--no-progress", *FORGET]) == 0
    rows = {r["step"]: r for r in _rows(out)}
    assert sorted(rows) == [0, 2, 4]
    assert rows[0]["forget_kl"] == 0.0 and rows[4]["forget_kl"] > 0
    assert rows[2]["train_loss"] is not None  # from the checkpoint's trainer_state.json
    assert rows[4]["ft_loss"] is not None  # its eval_loss at that step
    (run,) = _runs(out)
    assert run["status"] == "finished" and json.loads(run["config"])["train"]["steps"] == 4
    assert sorted(p.name for p in (out / "runs" / run["run_id"]).iterdir()) == ["adapter-step2", "adapter-step4"]
    # the other verbs read the measured run as a sweep's
    assert main(["eval", str(out), "--suite", "choice", "--no-progress", "--set", "choice.limit=3",
                 "--set", "choice.max_new_tokens=2", "--set", "batch_size=4"]) == 0
    assert main(["export", str(out), "--format", "csv", "-o", str(tmp_path / "rows.csv")]) == 0
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 4
    # --steps checkpoints: every kept checkpoint of the trainer output (step 0 is the base itself)
    assert main(["eval", str(out), "--suite", "safety", "--steps", "checkpoints", "--no-progress",
                 "--set", "safety.limit=2", "--set", "safety.max_new_tokens=2"]) == 0
    keys = {s["model_key"] for s in Store(out).eval_summaries("safety")}
    assert keys == {"base", f"{run['run_id']}@2", f"{run['run_id']}@4"}


# -- example 2: the callback inside Trainer and SFTTrainer ------------------------------------------
def test_callback_in_a_trainer_logs_and_stores_rows_fit_reads(tmp_path, capsys):
    from transformers import Trainer

    from forgetscale.integrations import ForgettingCallback

    base = _base()
    data = _lm_dataset(base.tokenizer)
    run_dir = tmp_path / "run"
    callback = ForgettingCallback(max_tokens=256, block_length=32, run_dir=run_dir)
    trainer = Trainer(model=_lora(base.model, seed=1), args=_args(tmp_path / "t", eval_strategy="steps",
                                                                 eval_steps=1, max_steps=6),
                      train_dataset=data, eval_dataset=data[:4], processing_class=base.tokenizer,
                      callbacks=[callback])
    trainer.train()
    assert callback.trainer is trainer  # found from the frames that called it: logs go through trainer.log()
    logged = [e for e in trainer.state.log_history if "forgetting/kl" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4, 5, 6]
    assert all({"forgetting/ce", "forgetting/ce_hard", "forgetting/entropy"} <= set(e) for e in logged)
    assert logged[-1]["forgetting/kl"] > 0
    rows = {r["step"]: r for r in _rows(run_dir)}
    assert sorted(rows) == [0, 1, 2, 3, 4, 5, 6]
    assert rows[0]["forget_kl"] == 0.0
    assert all(rows[s]["ft_loss"] is not None for s in range(1, 7))  # the trainer's eval_loss
    (run,) = _runs(run_dir)
    assert run["method"] == "lora" and run["status"] == "finished"
    code = main(["fit", str(run_dir), "--bootstrap", "0", "--min-step", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 0, err
    assert (run_dir / "laws.json").is_file()


def test_callback_in_sft_trainer_full_finetune(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from forgetscale.data.embedded import news_articles
    from forgetscale.integrations import ForgettingCallback

    base = _base()
    texts = [t[:300] for t in news_articles()[:16]]
    callback = ForgettingCallback(max_tokens=256, block_length=32, every_steps=1, run_dir=tmp_path / "run")
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=2,
                     learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     disable_tqdm=True, max_length=32, eval_strategy="steps", eval_steps=1)
    trainer = SFTTrainer(model=base.model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         eval_dataset=Dataset.from_dict({"text": texts[:4]}), processing_class=base.tokenizer,
                         callbacks=[callback])
    trainer.train()
    assert callback.trainer is trainer
    logged = [e for e in trainer.state.log_history if "forgetting/kl" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    assert logged[-1]["forgetting/kl"] > 0
    rows = {r["step"]: r for r in _rows(tmp_path / "run")}
    assert sorted(rows) == [0, 1, 2, 3, 4] and rows[0]["forget_kl"] == 0.0  # fit needs 4 checkpoints
    assert all(rows[s]["ft_loss"] is not None for s in (1, 2, 3, 4))  # measured once per step, L_ft from eval
    (run,) = _runs(tmp_path / "run")
    assert run["method"] == "full" and run["trainable_params"] == sum(p.numel() for p in base.model.parameters())
    assert main(["fit", str(tmp_path / "run"), "--bootstrap", "0", "--min-step", "1"]) == 0  # fit reads the rows
    assert (tmp_path / "run" / "laws.json").is_file()


# -- example 4: a forgetting budget in training, and the in-budget pick afterwards ------------------
def _budget_trainer(out: Path, budget: float, on_exceed: str):
    from transformers import Trainer

    from forgetscale.integrations import ForgettingCallback

    base = _base()
    data = _lm_dataset(base.tokenizer)
    callback = ForgettingCallback(max_tokens=256, block_length=32, budget=budget, on_exceed=on_exceed)
    trainer = Trainer(model=_lora(base.model, seed=1), args=_args(out, eval_strategy="steps", eval_steps=1,
                                                                 max_steps=6),
                      train_dataset=data, eval_dataset=data[:4], processing_class=base.tokenizer, callbacks=[callback])
    return trainer, callback


def _kl_by_step(trainer) -> dict[int, float]:
    return {e["step"]: e["forgetting/kl"] for e in trainer.state.log_history if "forgetting/kl" in e}


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory):
    """The same run twice: warned past a tiny budget (it trains on: the KL path), then stopped at a budget
    between the KL of steps 2 and 3 of that path (same seeds, so the same path up to the stop)."""
    root = tmp_path_factory.mktemp("budget")
    warned, warn_cb = _budget_trainer(root / "warned", 1e-9, "warn")
    with pytest.warns(UserWarning, match="training goes on") as caught:
        warned.train()
    path = _kl_by_step(warned)
    budget = (path[2] + path[3]) / 2
    stopped, stop_cb = _budget_trainer(root / "stopped", budget, "stop")
    with pytest.warns(UserWarning, match="training stops"):
        stopped.train()
    return {"path": path, "budget": budget, "caught": caught, "warn_cb": warn_cb, "stopped": stopped,
            "stop_cb": stop_cb, "out": root / "stopped"}


def test_budget_warn_mode_warns_once_and_trains_on(budget_runs):
    path, caught, cb = budget_runs["path"], budget_runs["caught"], budget_runs["warn_cb"]
    assert sorted(path) == [1, 2, 3, 4, 5, 6]
    assert sum("over the budget" in str(w.message) for w in caught) == 1
    assert cb.budget.exceeded_at == 1 and cb.budget.last_in_budget is None and cb.budget.checkpoint is None


def test_budget_stop_ends_within_one_evaluation_and_keeps_the_last_in_budget_checkpoint(budget_runs):
    path, budget, trainer, cb, out = (budget_runs[k] for k in ("path", "budget", "stopped", "stop_cb", "out"))
    crossing = min(s for s, kl in path.items() if kl > budget)  # the first evaluation past the budget
    assert crossing >= 2
    assert trainer.state.global_step == crossing  # stopped at that evaluation, not one later
    assert _kl_by_step(trainer) == {s: path[s] for s in range(1, crossing + 1)}  # the same path up to there
    assert cb.budget.exceeded_at == crossing and cb.budget.last_in_budget == crossing - 1
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == list(range(1, crossing))  # every in-budget evaluation saved (save_strategy "no"); not the crossing
    assert cb.budget.checkpoint == out / f"checkpoint-{crossing - 1}"
    assert all(path[s] <= budget for s in saved)


def test_measure_budget_names_the_lowest_loss_checkpoint_within_it(budget_runs, tmp_path, capsys):
    out, budget = budget_runs["out"], budget_runs["budget"]
    run_dir = tmp_path / "run"
    argv = ["measure", "--base", TINY, "--trainer-output", str(out), "--out", str(run_dir), "--no-progress", *FORGET]
    assert main([*argv, "--budget", "10"]) == 0  # everything is within 10 nats
    rows = {r["step"]: r for r in _rows(run_dir) if r["step"] > 0}
    best = min(rows.values(), key=lambda r: r["ft_loss"])
    said = capsys.readouterr().out.strip().splitlines()[-1]
    step = best["step"]
    assert said.startswith(f"within KL 10: {out / f'checkpoint-{step}'} (step {step}): KL {best['forget_kl']:.5f} [")
    tight = min(r["forget_kl"] for r in rows.values()) * 1.0000001  # only the lowest-KL checkpoint is within
    assert main([*argv, "--budget", repr(tight)]) == 0
    low = min(rows.values(), key=lambda r: r["forget_kl"])
    assert f"(step {low['step']}): KL {low['forget_kl']:.5f}" in capsys.readouterr().out
    assert main([*argv, "--budget", "1e-12"]) == 1  # nothing within: exit 1, one line naming the lowest
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetscale: no measured checkpoint has forgetting KL <= 1e-12; the lowest is") and "\n" not in err
    assert budget > 0


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "abc"])
def test_bad_budget_is_one_line_exit_2(value, tmp_path, capsys):
    argv = ["measure", "--base", TINY, "--trainer-output", str(tmp_path), "--out", str(tmp_path / "run"),
            "--budget", value]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: not a number at all
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("forgetscale: ") and "\n" not in err and "--budget" in err, err
    assert not (tmp_path / "run").exists()


def test_bad_budget_in_the_callback_names_the_argument():
    from forgetscale.integrations import ForgettingCallback

    with pytest.raises(ValueError, match="budget: must be a finite number of nats > 0; got -0.5"):
        ForgettingCallback(budget=-0.5)
    with pytest.raises(ValueError, match="on_exceed: must be one of stop, warn; got 'halt'"):
        ForgettingCallback(budget=0.1, on_exceed="halt")


# -- bad input: one line, exit 2, nothing stored lost -----------------------------------------------
@pytest.fixture(scope="module")
def stored_run(adapter_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stored") / "run"
    assert main(["measure", "--base", TINY, "--adapter", str(adapter_dir), "--out", str(out), "--no-progress",
                 *FORGET]) == 0
    return out


def _fails(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgetscale: ") and "\n" not in err, err
    return err


def _other_architecture_adapter(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    _lora(other).save_pretrained(path)
    return path


def test_bad_inputs_are_one_line_and_keep_the_store(stored_run, tmp_path, capsys):
    before = _rows(stored_run)
    common = ["--base", TINY, "--out", str(stored_run), "--no-progress", *FORGET]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    err = _fails(["measure", "--adapter", str(plain), *common], capsys)
    assert "not a PEFT adapter folder" in err
    err = _fails(["measure", "--adapter", str(_other_architecture_adapter(tmp_path / "other")), *common], capsys)
    assert "q_proj" in err and "shape" in err and "another architecture" in err
    empty = tmp_path / "trainer-out"
    empty.mkdir()
    err = _fails(["measure", "--trainer-output", str(empty), *common], capsys)
    assert "no checkpoint-*/ folders" in err
    err = _fails(["measure", "--adapter", str(tmp_path / "missing"), *common], capsys)
    assert "no such folder" in err
    err = _fails(["measure", "--base", TINY, "--adapter", str(plain), "--out", str(stored_run), "--no-progress",
                  "--set", "forgetting.max_tokens=512"], capsys)
    assert "not a PEFT adapter folder" in err  # inputs are checked before the store is touched
    assert _rows(stored_run) == before


def _digest(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha256((run_dir / "results.sqlite").read_bytes()).hexdigest()


def _adapter_with_tokenizer(path: Path, edit) -> Path:
    """An adapter trained on the base, saved with a tokenizer changed by `edit`."""
    base = _base()
    _lora(base.model).save_pretrained(path)
    edit(base.tokenizer, path)
    return path


def _add_token(tokenizer, path: Path) -> None:
    tokenizer.add_tokens(["<my_new_token>"])
    tokenizer.save_pretrained(path)


def _swap_two_ids(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (1000, 1001))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (path / "tokenizer.json").write_text(json.dumps(spec))


def _full_with_swapped_tokenizer(path: Path) -> Path:
    base = _base()
    base.model.save_pretrained(path)
    _swap_two_ids(base.tokenizer, path)
    return path


def _full_with_other_vocabulary(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    base = _base().model.config
    other = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=base.hidden_size,
                                         intermediate_size=base.intermediate_size,
                                         num_hidden_layers=base.num_hidden_layers,
                                         num_attention_heads=base.num_attention_heads,
                                         num_key_value_heads=base.num_key_value_heads, tie_word_embeddings=True))
    other.save_pretrained(path)
    return path


def _gpt2_adapter(path: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2))
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")).save_pretrained(path)
    return path


def _plain_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("hello")
    return path


def _empty_folder(path: Path) -> Path:
    path.mkdir()
    return path


# (flag, how the input is made, what the one line must say): each refused before the store is written
BAD_INPUTS = {
    "not an adapter": ("--adapter", _plain_folder, ["not a PEFT adapter folder"]),
    "missing folder": ("--adapter", lambda p: p, ["no such folder"]),
    "adapter, other shapes": ("--adapter", _other_architecture_adapter,
                              ["another architecture", "q_proj.lora_A.weight has shape [4, 32]", "takes 64 inputs"]),
    "adapter, other modules": ("--adapter", _gpt2_adapter,
                               ["module 'transformer.h.0.attn.c_attn' is not in the base model", "architecture"]),
    "adapter, tokenizer with an added token": (
        "--adapter", lambda p: _adapter_with_tokenizer(p, _add_token),
        ["saved tokenizer differs", "has 49153 tokens, the base's 49152", "'<my_new_token>'"]),
    "adapter, tokenizer with other ids": (
        "--adapter", lambda p: _adapter_with_tokenizer(p, _swap_two_ids),
        ["saved tokenizer differs", "to id 1000, the base's tokenizer to id 1001"]),
    "checkpoint, tokenizer with other ids": ("--model", _full_with_swapped_tokenizer,
                                             ["model ", "saved tokenizer differs", "to id 1000"]),
    "checkpoint, other vocabulary": ("--model", _full_with_other_vocabulary,
                                     ["vocabulary has 1000 tokens", "the base model's 49152"]),
    "trainer output, no checkpoints": ("--trainer-output", _empty_folder, ["no checkpoint-*/ folders"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_the_store_byte_identical(case, stored_run, tmp_path, capsys):
    flag, make, wanted = BAD_INPUTS[case]
    source = make(tmp_path / "source")
    before = _digest(stored_run)
    err = _fails(["measure", "--base", TINY, flag, str(source), "--out", str(stored_run), "--no-progress", *FORGET],
                 capsys)
    assert "Traceback" not in err
    for text in wanted:
        assert text in err, err
    assert _digest(stored_run) == before
    assert not (stored_run / "results.sqlite-wal").exists() or (stored_run / "results.sqlite-wal").stat().st_size == 0


@pytest.mark.parametrize("processes", ["1", "2"])
def test_an_out_path_that_is_a_file_is_one_line_and_the_file_is_kept(processes, adapter_dir, tmp_path, capsys):
    """On one process and before `--processes 2` launches any (the launcher's pre-check), the same line."""
    out = tmp_path / "results.txt"
    out.write_text("mine")
    err = _fails(["measure", "--base", TINY, "--adapter", str(adapter_dir), "--out", str(out), "--no-progress",
                  "--processes", processes, *FORGET], capsys)
    assert err == f"forgetscale: {out}: exists and is not a directory"
    assert out.read_text() == "mine"


def test_an_adapter_recording_another_base_name_warns_and_is_measured(adapter_dir, tmp_path, capsys):
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter_dir, renamed)
    config = json.loads((renamed / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someorg/llama-mirror"
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["measure", "--base", TINY, "--adapter", str(renamed), "--out", str(out), "--no-progress",
                 *FORGET]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "\n" not in err, err
    assert "records base 'someorg/llama-mirror'" in err and f"against '{TINY}'" in err
    assert sorted(r["step"] for r in _rows(out)) == [0, 1]
    # the base it was saved from, by its own path: no warning
    again = tmp_path / "again"
    assert main(["measure", "--base", TINY, "--adapter", str(adapter_dir), "--out", str(again), "--no-progress",
                 *FORGET]) == 0
    assert "warning" not in capsys.readouterr().err


def test_different_forgetting_settings_are_refused(stored_run, adapter_dir, capsys):
    before, digest = _rows(stored_run), _digest(stored_run)
    err = _fails(["measure", "--base", TINY, "--adapter", str(adapter_dir), "--out", str(stored_run),
                  "--no-progress", "--set", "forgetting.max_tokens=512", "--set", "train.context_length=32"], capsys)
    assert "forgetting.max_tokens" in err
    assert _rows(stored_run) == before and _digest(stored_run) == digest
    with sqlite3.connect(stored_run / "results.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


# -- the real embedded model --------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_lora_trained_two_steps(tmp_path):
    from forgetscale.models import load_model

    base = load_model("smollm2-135m-instruct")
    tuned = _lora(base.model, r=2)
    tuned.train()
    batch = _lm_dataset(base.tokenizer, n=2, length=32)
    ids = torch.stack([b["input_ids"] for b in batch])
    optim = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        tuned(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad()
    tuned.save_pretrained(tmp_path / "lora-step2")
    del tuned, base
    out = tmp_path / "run"
    assert main(["measure", "--base", "smollm2-135m-instruct", "--adapter", str(tmp_path / "lora-step2"),
                 "--out", str(out), "--no-progress", *FORGET]) == 0
    rows = {r["step"]: r for r in _rows(out)}
    assert sorted(rows) == [0, 2]
    assert rows[0]["forget_kl"] == 0.0 and 0 < rows[2]["forget_kl"] < 1.0
    assert 0 < rows[2]["base_entropy"] < 10


@pytest.mark.slow
def test_smollm2_sweep_adapter_measured_equals_the_sweep_row(tmp_path, write_yaml):
    """The real model: an adapter a sweep saved, measured with `measure`, gives the sweep's stored numbers."""
    from forgetscale.config import parse_config
    from forgetscale.sweep import run_sweep

    data = tiny_config(model="smollm2-135m-instruct", method={"name": "lora", "ranks": [2]},
                       train={"steps": 2, "checkpoints": [0, 2], "save_adapters": "all", "threads": 1})
    sweep_dir = tmp_path / "sweep"
    run_sweep(parse_config(data), sweep_dir, progress=False)
    with Store(sweep_dir, create=False) as store:
        (run,) = store.runs()
        stored = {r["step"]: r for r in store.checkpoints(run["run_id"])}
    out = tmp_path / "measured"
    assert main(["measure", "--base", "smollm2-135m-instruct", "--config", str(write_yaml(data)), "--data",
                 "embedded:news", "--adapter", str(sweep_dir / "runs" / run["run_id"] / "adapter-step2"),
                 "--out", str(out), "--no-progress"]) == 0
    rows = {r["step"]: r for r in _rows(out)}
    assert sorted(rows) == [0, 2] and stored[2]["forget_kl"] > 0
    for key in ("forget_kl", "forget_ce", "forget_ce_hard", "ft_loss", "ft_kl", "base_entropy"):
        assert rows[2][key] == pytest.approx(stored[2][key], abs=1e-5), key


def test_block_interval_is_the_t_interval_over_block_means():
    from scipy import stats

    from forgetscale.metric import block_interval

    means = torch.tensor([1.0, 1.5, 0.5, 2.0, 1.2], dtype=torch.float64)
    counts = torch.full((5,), 31)
    lo, hi = block_interval(means * 31, counts)
    want = stats.t.interval(0.95, 4, loc=float(means.mean()), scale=float(means.std()) / 5**0.5)
    assert (lo, hi) == pytest.approx(want, abs=1e-12)
    assert all(x != x for x in block_interval(means[:1] * 31, counts[:1]))  # one block: no interval (NaN)


def test_a_failed_start_claims_nothing(adapter_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(["measure", "--base", TINY, "--adapter", str(_other_architecture_adapter(tmp_path / "other")),
            "--out", str(out), "--no-progress", *FORGET], capsys)
    assert main(["measure", "--base", TINY, "--adapter", str(adapter_dir), "--out", str(out), "--no-progress",
                 "--set", "forgetting.max_tokens=128", "--set", "train.context_length=32"]) == 0
    assert sorted(r["step"] for r in _rows(out)) == [0, 1]
