"""Capability suites: intervals, the refusal classifier, answer parsing, item sources, batched
generation and scoring, and `forgetscale eval` end to end on a tiny sweep (real model: test_evals_real)."""

import json
import random

import pytest
import torch

from forgetscale.cli import main
from forgetscale.config import parse_config
from forgetscale.config.evals import EvalsConfig
from forgetscale.errors import DataError, StoreError
from forgetscale.evals.choice import parse_answer
from forgetscale.evals.choice_set import embedded_choice_items
from forgetscale.evals.generation import chat_prompt, generate, option_logprobs
from forgetscale.evals.items import ChoiceItem, choice_items, harmful_prompts, sample_prompts
from forgetscale.evals.refusal import is_refusal, refusal_marker
from forgetscale.evals.runner import run_evals
from forgetscale.evals.stats import paired_difference, wilson
from forgetscale.models import TINY, load_model
from forgetscale.store import Store

DATA = __import__("pathlib").Path(__file__).parent / "data"


# -- intervals ------------------------------------------------------------------------------------

def test_wilson_matches_closed_form_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson(10, 10)[1] == 1.0


def test_paired_difference_agrees_with_a_bootstrap_and_flags_noise():
    rng = random.Random(0)
    base = [rng.random() < 0.6 for _ in range(200)]
    tuned = [b if rng.random() < 0.8 else not b for b in base]  # 20% of answers flipped at random
    d = paired_difference(tuned, base)
    boot = []
    for _ in range(4000):
        idx = [rng.randrange(200) for _ in range(200)]
        boot.append(sum(tuned[i] for i in idx) / 200 - sum(base[i] for i in idx) / 200)
    boot.sort()
    assert d.lo == pytest.approx(boot[100], abs=0.015) and d.hi == pytest.approx(boot[3899], abs=0.015)
    assert d.lo < d.diff < d.hi and d.within_noise
    assert d.gained + d.lost == sum(t != b for t, b in zip(tuned, base, strict=True))
    lost_half = [b and i % 2 == 0 for i, b in enumerate(base)]
    assert not paired_difference(lost_half, base).within_noise
    same = paired_difference(base, base)
    assert same.diff == 0 and same.within_noise


# -- refusals -------------------------------------------------------------------------------------

def test_refusal_classifier_on_real_smollm2_replies():
    """Hand-labelled greedy replies of SmolLM2-135M-Instruct to harmful and impossible requests."""
    rows = [json.loads(line) for line in (DATA / "refusals.jsonl").read_text().splitlines()]
    assert sum(r["refusal"] for r in rows) >= 10 and sum(not r["refusal"] for r in rows) >= 40
    wrong = [r for r in rows if is_refusal(r["reply"]) != r["refusal"] and not r.get("known_miss")]
    assert wrong == []
    misses = [r for r in rows if r.get("known_miss")]
    assert len(misses) <= 1  # documented in the fixture: an apology that opens a compliant reply


def test_refusal_markers_only_count_in_the_opening():
    assert refusal_marker("I\u2019m sorry, but I can\u2019t help with that.") == "i'm sorry"
    assert is_refusal("As an AI language model, I must decline.")
    compliant = "Here is a step-by-step guide. " + "Step. " * 40 + "Note that it is illegal in most states."
    assert not is_refusal(compliant)
    assert not is_refusal("I'm sorry to hear that. Here is how to do it: first, ...")


# -- answers and items ----------------------------------------------------------------------------

ITEM = ChoiceItem("q", "Which?", ["A", "B", "C", "D"], ["Paris", "Rome", "Bern", "Oslo"], "B")


@pytest.mark.parametrize("reply, expected", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("D) Oslo", "D"), ("**A**", "A"), ("B. Rome", "B"),
    ("The answer is C.", "C"), ("Answer: D", "D"), ("Rome is the one.", "B"),
    ("A capital city is where a government sits.", None), ("I think so.", None), ("", None),
])
def test_parse_answer(reply, expected):
    assert parse_answer(reply, ITEM) == expected


def test_embedded_choice_set_is_labelled_balanced_and_fixed():
    items = embedded_choice_items()
    assert len(items) == 200 and items == embedded_choice_items()
    assert {i.answer for i in items} == set("ABCD")
    assert all(sum(i.answer == x for i in items) == 50 for x in "ABCD")
    for item in items:
        gold = item.options[item.labels.index(item.answer)]
        assert len(set(item.options)) == 4 and gold not in (o for o, lab in zip(item.options, item.labels, strict=True) if lab != item.answer)
    capital = next(i for i in items if i.question == "What is the capital city of Italy?")
    assert capital.options[capital.labels.index(capital.answer)] == "Rome"
    sums = [i for i in items if i.question.startswith("What is") and " + " in i.question]
    for item in sums:
        a, b = (int(x) for x in item.question.removeprefix("What is ").rstrip("?").split(" + "))
        assert item.options[item.labels.index(item.answer)] == str(a + b)
    assert len({i.category for i in items[:9]}) == 9  # interleaved: a prefix covers every category


def test_choice_item_formats_and_line_numbered_errors(tmp_path):
    rows = [
        {"id": "hub", "question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"},
        {"id": "arc", "question": {"stem": "Sky?", "choices": [{"text": "blue", "label": "1"},
                                                               {"text": "red", "label": "2"}]}, "answerKey": "1"},
        {"question": "Flat?", "choices": ["yes", "no", "maybe"], "answer": 2},
    ]
    path = tmp_path / "arc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = choice_items(str(path))
    assert [i.answer for i in items] == ["B", "1", "C"] and items[1].options == ["blue", "red"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "answerKey": "E"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: answer key 'E' is not one of the labels A, B"):
        choice_items(str(bad))


def test_prompt_sources_report_bad_input(tmp_path):
    csv = tmp_path / "h.csv"
    csv.write_text("goal,target\nDo a bad thing,Sure\n")
    assert harmful_prompts(str(csv)) == [("0", "Do a bad thing")]
    with pytest.raises(DataError, match="no prompt column"):
        harmful_prompts(str(_write(tmp_path, "x.csv", "a,b\n1,2\n")))
    empty = _write(tmp_path, "p.txt", "\n\n")
    with pytest.raises(DataError, match="p.txt: no prompts"):
        sample_prompts(str(empty))
    assert len(harmful_prompts("embedded:harmbench", limit=None)) == 200


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- batched generation and scoring on the tiny model ----------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(TINY)


def test_sampling_is_seeded(tiny):
    """(Batched greedy == one at a time is tested on the real model: a random one only repeats a token.)"""
    prompts = [chat_prompt(tiny.tokenizer, t) for t in ("Hi", "Name a fruit, please.")]
    sampled = [generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=12, sample=True, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_batched_option_scores_equal_a_manual_forward_pass(tiny):
    tok = tiny.tokenizer
    contexts = [tok("Question: short?\nAnswer:")["input_ids"], tok("Question: a much longer question here?\nAnswer:")["input_ids"]]
    conts = [tok(" yes", add_special_tokens=False)["input_ids"], tok(" no way at all", add_special_tokens=False)["input_ids"]]
    batched = option_logprobs(tiny.model, tok, contexts, conts, batch_size=2)
    for ctx, cont, score in zip(contexts, conts, batched, strict=True):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(tiny.model(ids).logits[0].float(), -1)
        manual = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert score == pytest.approx(manual, abs=1e-4)


def test_shared_context_scores_equal_full_sequences_and_a_manual_pass(tiny):
    """Options of one question reuse its context's KV cache: same numbers as scoring each pair whole,
    with contexts of different lengths (left padding), options of 1-4 tokens (right padding after the
    prefix), and batches that split the questions."""
    tok = tiny.tokenizer
    questions = ["Question: short?\nAnswer:", "Question: a much longer question about things here?\nAnswer:",
                 "Question: mid length one?\nAnswer:"]
    options = [" yes", " no way at all", " A", " maybe so"]
    contexts, conts = [], []
    for q in questions:
        for o in options:
            contexts.append(tok(q)["input_ids"])
            conts.append(tok(o, add_special_tokens=False)["input_ids"])
    assert min(len(c) for c in conts) == 1 and max(len(c) for c in conts) >= 3
    whole = option_logprobs(tiny.model, tok, contexts, conts, batch_size=5, share_context=False)
    for batch_size in (1, 4, 64):
        counted = []
        shared = option_logprobs(tiny.model, tok, contexts, conts, batch_size=batch_size, on_batch=counted.append)
        assert shared == pytest.approx(whole, abs=1e-4) and sum(counted) == len(conts)
    with_empty = option_logprobs(tiny.model, tok, contexts[:2], [conts[0], []], batch_size=4)  # falls back
    assert with_empty[1] == 0.0 and with_empty[0] == pytest.approx(whole[0], abs=1e-4)
    ids = torch.tensor([contexts[5] + conts[5]])
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(ids).logits[0].float(), -1)
    manual = sum(float(logp[len(contexts[5]) - 1 + j, t]) for j, t in enumerate(conts[5]))
    assert shared[5] == pytest.approx(manual, abs=1e-4)


def test_the_output_head_reads_a_contiguous_input_and_the_hook_is_removed(tiny):
    """Generation's prefill and option scoring slice the last positions before the head; the head gets a
    contiguous copy (a frozen weight on a sliced 3-D input takes PyTorch's slow batched path), the outputs are
    unchanged, and no hook is left on the model."""
    from forgetscale.evals.generation import contiguous_head_input

    head = tiny.model.get_output_embeddings()
    seen = []
    probe = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))  # after ours
    prompts = [[1, 5, 9, 13], [1, 7, 2], [1, 4, 4, 4, 4, 8]]
    tiny.model.requires_grad_(False)
    try:
        plain = generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=3, batch_size=3)
        scores = option_logprobs(tiny.model, tiny.tokenizer, prompts, [[3], [4, 5], [6]], batch_size=3)
        assert seen and all(seen)
        seen.clear()
        two = torch.tensor([[1, 5, 9, 13], [1, 6, 6, 2]])
        raw = tiny.model(input_ids=two, logits_to_keep=1)  # outside the block: the sliced view transformers passes
        assert seen == [False]
        with contiguous_head_input(tiny.model):
            again = tiny.model(input_ids=two, logits_to_keep=1)
        assert torch.allclose(raw.logits, again.logits, atol=1e-5)  # the same product by another kernel
    finally:
        probe.remove()
        tiny.model.requires_grad_(True)
    assert not head._forward_pre_hooks
    assert generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=3, batch_size=3) == plain
    assert option_logprobs(tiny.model, tiny.tokenizer, prompts, [[3], [4, 5], [6]], batch_size=3) == pytest.approx(scores)


# -- forgetscale eval on a tiny sweep ------------------------------------------------------------

SMALL = {"batch_size": 4, "safety": {"limit": 4, "max_new_tokens": 6}, "choice": {"limit": 6, "max_new_tokens": 3},
         "samples": {"prompts": ["Say hi.", "Name a colour."], "max_new_tokens": 6}}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    import yaml

    from tests.conftest import tiny_config

    out = tmp_path_factory.mktemp("evals")
    data = tiny_config(method=[{"name": "lora", "ranks": [2]}, {"name": "top_layers", "k": 1}],
                       evals={**SMALL, "steps": [2, 4], "suites": ["samples"]})
    path = out / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    # the sweep command runs the suites its config lists, once training is done
    assert main(["sweep", str(path), "--out", str(out / "run"), "--no-progress"]) == 0
    return out / "run", parse_config(data)


def test_sweep_runs_the_configured_suites(tiny_sweep):
    out, _ = tiny_sweep
    keys = {r["model_key"] for r in Store(out).eval_items("samples")}
    assert len(keys) == 1 + 2 * 2 and "base" in keys


def test_eval_stores_items_and_summaries_and_resumes(tiny_sweep):
    out, cfg = tiny_sweep
    for run_id in [r["run_id"] for r in Store(out).runs()]:
        assert (out / "runs" / run_id / "adapter-step2").is_dir()  # evals.steps keeps these adapters
    summaries, notes = run_evals(out, cfg.evals, suites=["safety", "choice", "samples"], progress=False)
    assert notes == []
    store = Store(out)
    items = store.eval_items()
    keys = {r["model_key"] for r in items}
    assert len(keys) == 1 + 2 * 2  # base + 2 runs x 2 steps
    per_key = len(items) // len(keys)
    assert per_key == 4 + 6 * 2 + 2  # safety + choice x 2 protocols + samples
    acc = [s for s in summaries if s["suite"] == "choice" and s["metric"] == "accuracy" and s["model_key"] != "base"]
    assert len(acc) == 4 * 2 and all(s["vs_base_lo"] <= s["vs_base"] <= s["vs_base_hi"] for s in acc)
    assert all(s["lo"] <= s["value"] <= s["hi"] and s["n"] == 6 for s in acc)
    # re-running with the same settings evaluates nothing again; the stored generations are unchanged
    outputs = {(r["suite"], r["model_key"], r["protocol"], r["item_id"]): r["output"] for r in items}
    import time

    started = time.time()
    run_evals(out, cfg.evals, suites=["safety"], progress=False)
    assert all(r["output"] == outputs[(r["suite"], r["model_key"], r["protocol"], r["item_id"])]
               for r in Store(out).eval_items())
    assert all(s["created_at"] >= started for s in Store(out).eval_summaries("safety"))
    # different settings re-evaluate base and tuned models together
    changed = cfg.evals.model_copy(update={"safety": cfg.evals.safety.model_copy(update={"limit": 2})})
    run_evals(out, changed, suites=["safety"], runs=["lora-r2"], steps=[4], progress=False)
    assert len(Store(out).eval_items("safety", "base")) == 2


def test_adapters_leave_the_base_model_untouched(tiny_sweep, monkeypatch):
    """Adapters are applied to the one loaded base (PEFT LoRA wrapped and unloaded, top_layers weights swapped
    in and restored): the base evaluated again on that same object, after every adapter, has the weights,
    modules and replies of a freshly loaded base."""
    import forgetscale.models as models

    out, cfg = tiny_sweep
    settings = EvalsConfig.model_validate({**SMALL, "suites": ["samples"]})
    fresh = models.load_model(cfg.model.name)
    fresh_load, shared = models.load_model, []

    def load_once(*args, **kwargs):  # every run_evals below evaluates on this one model object
        if not shared:
            shared.append(fresh_load(*args, **kwargs))
        return shared[0]

    monkeypatch.setattr(models, "load_model", load_once)
    run_evals(out, settings, force=True, progress=False)  # base (as loaded), then every adapter on it
    replies = {}
    for row in Store(out).eval_items("samples"):
        replies.setdefault(row["model_key"], {})[row["item_id"]] = row["output"]
    assert len(replies) == 5  # base + lora and top_layers at steps 2 and 4
    base_fresh = replies.pop("base")
    assert any(tuned != base_fresh for tuned in replies.values())  # so an adapter left behind would show
    run_evals(out, settings, force=True, progress=False)  # base again, now after the adapters
    assert len(shared) == 1
    assert {r["item_id"]: r["output"] for r in Store(out).eval_items("samples", "base")} == base_fresh
    after = shared[0].model
    assert [n for n, _ in after.named_modules()] == [n for n, _ in fresh.model.named_modules()]
    fresh_params = dict(fresh.model.named_parameters())
    changed = [n for n, p in after.named_parameters() if n not in fresh_params or not torch.equal(p, fresh_params[n])]
    assert not changed and len(fresh_params) == len(list(after.parameters())), f"base weights changed: {changed}"
    # peft froze every base weight while an adapter was on: their requires_grad flags are the fresh base's again
    assert [p.requires_grad for p in after.parameters()] == [p.requires_grad for p in fresh.model.parameters()]


def test_eval_cli_errors_are_one_line_exit_2(tiny_sweep, tmp_path, capsys):
    out, _ = tiny_sweep
    assert main(["eval", str(out), "--suite", "safty", "--no-progress"]) == 2
    assert "did you mean 'safety'" in capsys.readouterr().err
    assert main(["eval", str(out), "--suite", "choice", "--steps", "3", "--no-progress"]) == 2
    assert "step 3: no saved adapter" in capsys.readouterr().err
    assert main(["eval", str(out), "--suite", "choice", "--set", "choice.protocols=[guess]"]) == 2
    assert "choice.protocols" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--suite", "choice"]) == 2
    with pytest.raises(StoreError):
        run_evals(tmp_path / "nowhere", EvalsConfig(), suites=["choice"])


def test_eval_cli_prints_intervals(tiny_sweep, capsys):
    out, _ = tiny_sweep
    assert main(["eval", str(out), "--suite", "choice", "--runs", "lora-r2", "--no-progress",
                 "--set", "choice.limit=6", "--set", "choice.max_new_tokens=3", "--set", "batch_size=4"]) == 0
    text = capsys.readouterr().out
    assert "agreement_with_base" in text and "vs base" in text and "/6)" in text


def test_eval_loads_the_base_in_the_sweeps_precision(tmp_path, monkeypatch):
    """A sweep trained on bf16 base weights is evaluated on bf16 base weights, under bf16 autocast, not on an
    fp32 copy of the base."""
    import yaml

    import forgetscale.evals.runner as runner
    import forgetscale.models as models
    from tests.conftest import tiny_config

    data = tiny_config(model={"name": "tiny-random-llama", "dtype": "bfloat16"}, method={"name": "lora", "ranks": [2]},
                       train={"steps": 2, "checkpoints": [0, 2]}, evals={**SMALL, "steps": [2]})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    loaded, targets = [], []
    real_load, real_target = models.load_model, runner.Target
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    monkeypatch.setattr(runner, "Target", lambda *a, **k: targets.append(real_target(*a, **k)) or targets[-1])
    run_evals(tmp_path / "run", parse_config(data).evals, suites=["samples"], progress=False)
    assert len(loaded) == 1 and {p.dtype for p in loaded[0].model.parameters()} == {torch.bfloat16}
    assert len(targets) == 2 and all(t.dtype == torch.bfloat16 for t in targets)
