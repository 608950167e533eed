"""model.dtype, train.gradient_checkpointing and model.quantization: half-precision base weights with fp32
trained weights, the same rows with and without checkpointing, one-line refusals where a mode cannot run;
and the CPU speed settings that change no number beyond rounding (model.attention, peft's LoRA input
casts, train.allocator)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from forgetscale.cli import main
from forgetscale.config import parse_config
from forgetscale.errors import ConfigError
from forgetscale.methods.attach import attach, skip_lora_input_casts, upcast_trainable
from forgetscale.models import (
    attention_implementation,
    compute_dtype,
    load_base_weights,
    load_configured_model,
    weights_dtype,
)
from forgetscale.runs import plan_runs
from forgetscale.store import CheckpointRow
from forgetscale.sweep import build_context, run_sweep
from forgetscale.train import NoHooks, train_run

CPU = torch.device("cpu")
KEYS = ("step", "forget_ce", "forget_ce_hard", "forget_kl", "base_entropy", "ft_kl", "ft_loss", "train_loss")


class ListSink:
    """A RowSink holding the rows in a list (train.RowSink's four methods)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def update_run(self, run_id: str, **fields) -> None:
        pass

    def checkpoints(self, run_id: str) -> list[dict]:
        return list(self.rows)

    def delete_checkpoints_after(self, run_id: str, step: int) -> None:
        self.rows = [r for r in self.rows if r["step"] <= step]

    def add_checkpoint(self, row: CheckpointRow) -> None:
        self.rows.append(dataclasses.asdict(row))  # as the store reads it back


class Stop(Exception):
    pass


def _values(rows: list[dict]) -> list[list]:
    return [[r[k] for k in KEYS] for r in rows]


def test_auto_is_fp32_on_cpu_and_half_weights_compute_in_their_dtype(tiny_cfg):
    assert weights_dtype("auto", CPU) == torch.float32
    cfg = parse_config(tiny_cfg(model={"name": "tiny-random-llama", "dtype": "bfloat16"}))
    assert weights_dtype(cfg.model.dtype, CPU) == torch.bfloat16
    assert compute_dtype(cfg, CPU) == torch.bfloat16  # train.dtype auto (fp32 on CPU) meets bf16 weights in autocast
    assert compute_dtype(parse_config(tiny_cfg()), CPU) is None


@pytest.mark.parametrize("method", [{"name": "lora", "ranks": [2]}, {"name": "top_layers", "k": 1}])
def test_half_base_weights_keep_the_trained_weights_fp32(tiny_cfg, method):
    cfg = parse_config(tiny_cfg(model={"name": "tiny-random-llama", "dtype": "bfloat16"}, method=[method]))
    spec = cfg.methods[0]
    model = attach(load_base_weights(cfg), spec, spec.run_ranks()[0])
    upcast_trainable(model)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}


def test_bf16_weights_train_and_resume_to_identical_rows(tiny_cfg, tmp_path):
    cfg = parse_config(tiny_cfg(model={"name": "tiny-random-llama", "dtype": "bfloat16"},
                                method={"name": "lora", "ranks": [2]},
                                train={"steps": 6, "checkpoints": [0, 2, 4, 6], "threads": 1}))
    plan = plan_runs(cfg)[0]
    ctx = build_context(cfg, tmp_path / "clean")
    seen = {}

    def setup(model):
        seen["dtypes"] = {n: p.dtype for n, p in model.named_parameters()}
        return NoHooks()

    clean = ListSink()
    train_run(plan, ctx, clean, setup)
    assert seen["dtypes"]["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    rows = clean.rows
    assert [r["step"] for r in rows] == [0, 2, 4, 6] and rows[0]["forget_kl"] == 0.0
    assert all(math.isfinite(r["forget_kl"]) for r in rows) and rows[-1]["forget_kl"] > 0

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Stop

    resumed = ListSink()
    other = dataclasses.replace(ctx, out_dir=tmp_path / "killed")
    with pytest.raises(Stop):
        train_run(plan, other, resumed, on_step=stop_at_3)
    assert [r["step"] for r in resumed.rows] == [0, 2]
    train_run(plan, other, resumed)  # from the state saved at step 2
    assert _values(resumed.rows) == _values(rows)


def test_gradient_checkpointing_gives_the_same_rows_and_run_ids(tiny_cfg, tmp_path):
    base = tiny_cfg(method={"name": "lora", "ranks": [2]}, train={"threads": 1})
    checkpointed = tiny_cfg(method={"name": "lora", "ranks": [2]},
                            train={"threads": 1, "gradient_checkpointing": True})
    a = run_sweep(parse_config(base), tmp_path / "a", progress=False)
    b = run_sweep(parse_config(checkpointed), tmp_path / "b", progress=False)
    assert [r["run_id"] for r in a.runs()] == [r["run_id"] for r in b.runs()]
    for x, y in zip(_values(a.checkpoints()), _values(b.checkpoints()), strict=True):
        assert all(u == v or abs(u - v) <= 1e-6 for u, v in zip(x, y, strict=True) if u is not None)


def test_new_keys_at_their_defaults_keep_run_ids(tiny_cfg):
    ids = [p.run_id for p in plan_runs(parse_config(tiny_cfg()))]
    explicit = tiny_cfg(model={"name": "tiny-random-llama", "dtype": "auto", "quantization": "none", "attention": "auto"},
                        forgetting={"reference": "memory"}, train={"gradient_checkpointing": False})
    assert [p.run_id for p in plan_runs(parse_config(explicit))] == ids
    bf16 = tiny_cfg(model={"name": "tiny-random-llama", "dtype": "bfloat16"})
    assert set(p.run_id for p in plan_runs(parse_config(bf16))).isdisjoint(ids)  # other numbers: other runs


def test_float16_weights_are_refused_on_cpu():
    with pytest.raises(ConfigError, match="model.dtype: float16 is not supported on CPU"):
        weights_dtype("float16", CPU)


def test_4bit_base_is_refused_with_one_line_where_it_cannot_run(tiny_cfg, write_yaml, capsys):
    path = write_yaml(tiny_cfg(model={"name": "tiny-random-llama", "quantization": "4bit"}, train={"device": "cpu"}))
    assert main(["sweep", str(path), "--out", str(path.parent / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("forgetscale: model.quantization: 4bit needs")
    full = tiny_cfg(model={"name": "tiny-random-llama", "quantization": "4bit"}, method="full")
    with pytest.raises(ConfigError, match="model.quantization: a 4-bit base cannot be trained by method 'full'"):
        plan_runs(parse_config(full))


@pytest.mark.slow
def test_smollm2_trains_with_bf16_weights_and_checkpointing(tmp_path):
    cfg = parse_config({
        "model": {"name": "smollm2-135m-instruct", "dtype": "bfloat16"},
        "finetune": {"heldout_max_tokens": 128, "max_examples": 40},
        "forgetting": {"max_tokens": 256},
        "method": {"name": "lora", "ranks": [2]},
        "train": {"steps": 2, "checkpoints": [0, 2], "batch_size": 2, "context_length": 64, "threads": 1,
                  "gradient_checkpointing": True, "lr": 1e-3},
    })
    store = run_sweep(cfg, tmp_path, progress=False)
    rows = store.checkpoints()
    assert [r["step"] for r in rows] == [0, 2] and rows[0]["forget_kl"] == 0.0
    assert 0 < rows[1]["forget_kl"] < 1 and math.isfinite(rows[1]["ft_loss"])


def test_a_sweep_stored_before_the_new_keys_resumes(tiny_cfg, tmp_path):
    import json

    cfg = parse_config(tiny_cfg(method={"name": "lora", "ranks": [2]}, train={"threads": 1}))
    store = run_sweep(cfg, tmp_path, progress=False)
    old = json.loads(store.get_meta("sweep_config"))  # as a sweep stored before this change wrote it
    for section, key in (("model", "dtype"), ("model", "quantization"), ("forgetting", "reference"),
                         ("train", "gradient_checkpointing")):
        del old[section][key]
    store.set_meta("sweep_config", json.dumps(old, sort_keys=True))
    again = run_sweep(cfg, tmp_path, progress=False)  # same runs, nothing to redo
    assert [r["status"] for r in again.runs()] == ["finished"]
    with pytest.raises(ConfigError, match="model.dtype: differs"):
        run_sweep(parse_config(tiny_cfg(model={"name": "tiny-random-llama", "dtype": "bfloat16"},
                                        method={"name": "lora", "ranks": [2]}, train={"threads": 1})),
                  tmp_path, progress=False)


def test_attention_auto_is_eager_only_for_half_precision_on_cpu_at_short_lengths(tiny_cfg):
    def pick(model=None, train=None, forgetting=None):
        cfg = parse_config(tiny_cfg(model={"name": "tiny-random-llama", **(model or {})}, train=train or {},
                                    forgetting=forgetting or {}))
        return attention_implementation(cfg, CPU)

    assert pick({"dtype": "bfloat16"}) == "eager"
    assert pick(train={"dtype": "bfloat16"}) == "eager"  # fp32 weights under bf16 autocast
    assert pick() is None  # fp32: transformers' default (SDPA)
    assert pick({"dtype": "bfloat16"}, {"context_length": 1024}) is None
    assert pick({"dtype": "bfloat16"}, forgetting={"block_length": 1024}) is None
    assert pick({"dtype": "bfloat16", "attention": "sdpa"}) == "sdpa"
    assert pick({"attention": "eager"}) == "eager"
    cfg = parse_config(tiny_cfg(model={"name": "tiny-random-llama", "dtype": "bfloat16"}))
    assert load_configured_model(cfg, CPU).model.config._attn_implementation == "eager"
    assert "attention" not in cfg.to_dict()["model"]  # at its default: run ids stored before it stay valid


def _assert_skipping_casts_changes_no_bit(base_cfg, method_cfg, rank: int, ids, scale: float) -> None:
    """The same seeded LoRA model (adapter moved off zero by `scale`) with and without peft's input casts."""
    outputs = []
    for skip in (False, True):
        torch.manual_seed(0)
        model = attach(load_base_weights(base_cfg), method_cfg.method[0], rank)
        upcast_trainable(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * scale)
        outputs.append(_lora_outputs(model, ids, skip))
    (a, ga), (b, gb) = outputs
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


def _lora_outputs(model, ids, skip: bool):
    if skip:
        assert skip_lora_input_casts(model) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()
    params = [p for p in model.parameters() if p.requires_grad]
    return logits, torch.autograd.grad(logits.square().mean(), params)


def test_skipping_lora_input_casts_under_autocast_changes_no_number(tiny_cfg):
    cfg = parse_config(tiny_cfg(method={"name": "lora", "ranks": [2]}))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    bf16 = parse_config(tiny_cfg(model={"name": "tiny-random-llama", "dtype": "bfloat16"}))
    _assert_skipping_casts_changes_no_bit(bf16, cfg, 2, ids, 0.05)
    dora = parse_config(tiny_cfg(method={"name": "dora", "ranks": [2]}))
    assert skip_lora_input_casts(attach(load_base_weights(dora), dora.method[0], 2)) == 0  # DoRA keeps its casts


@pytest.mark.slow
def test_smollm2_attention_kernels_and_lora_casts():
    """The embedded model in bf16 on CPU: auto loads eager attention; SDPA gives the same held-out loss to bf16
    rounding (and to fp32 rounding in fp32); skipping peft's input casts changes no bit."""
    from forgetscale.data import build_finetune_data
    from forgetscale.metric.sums import score
    from forgetscale.models import cache_root

    torch.set_num_threads(min(2, torch.get_num_threads()))
    spec = {"finetune": {"heldout_max_tokens": 512, "max_examples": 60}, "method": {"name": "lora", "ranks": [4]},
            "train": {"context_length": 128}}
    losses = {}
    for dtype in ("bfloat16", "float32"):
        for kernel in ("auto", "sdpa"):
            cfg = parse_config({**spec, "model": {"name": "smollm2-135m-instruct", "dtype": dtype, "attention": kernel}})
            loaded = load_configured_model(cfg, CPU)
            assert loaded.model.config._attn_implementation == ("eager" if (dtype, kernel) == ("bfloat16", "auto")
                                                               else "sdpa")
            data = build_finetune_data(cfg.finetune, loaded.tokenizer, 128, cache_root() / "data")
            compute = compute_dtype(cfg, CPU)
            losses[dtype, kernel] = score(loaded.model, data.heldout, 8, CPU, compute)["nll"]
    assert abs(losses["bfloat16", "auto"] - losses["bfloat16", "sdpa"]) < 5e-3
    assert abs(losses["float32", "auto"] - losses["float32", "sdpa"]) < 1e-5
    cfg = parse_config({**spec, "model": {"name": "smollm2-135m-instruct", "dtype": "bfloat16"}})
    _assert_skipping_casts_changes_no_bit(cfg, cfg, 4, data.heldout.input_ids[:2], 0.01)


def test_allocator_retains_freed_memory_on_cpu_only_and_never_changes_a_run(tiny_cfg):
    from forgetscale import host_memory

    assert host_memory.apply_allocator("system", CPU) is False
    assert host_memory.apply_allocator("auto", torch.device("cuda")) is False  # a GPU run's host side: untouched
    glibc = host_memory._libc() is not None
    assert host_memory.apply_allocator("auto", CPU) is glibc  # this project's machines: glibc, accepted
    assert host_memory.apply_allocator("retain", CPU) is glibc
    ids = [p.run_id for p in plan_runs(parse_config(tiny_cfg()))]
    for choice in ("system", "retain"):
        assert [p.run_id for p in plan_runs(parse_config(tiny_cfg(train={"allocator": choice})))] == ids


def test_one_measuring_precision_follows_the_weights_not_the_trainer():
    """models.measuring_dtype: the callback, `measure` and sweeps measure fp32 weights in fp32 whatever autocast
    trains them, half-precision weights under autocast in their own dtype; forgetting.dtype overrides."""
    from forgetscale.models import measuring_dtype, weights_dtype_of

    cpu = torch.device("cpu")
    assert measuring_dtype(torch.float32) is None
    assert measuring_dtype(torch.bfloat16) == torch.bfloat16 and measuring_dtype(torch.float16) == torch.float16
    assert measuring_dtype(torch.float32, "bfloat16", cpu) == torch.bfloat16
    assert measuring_dtype(torch.float32, "float32") is None
    with pytest.raises(ConfigError, match="forgetting.dtype: float32 needs fp32 weights"):
        measuring_dtype(torch.bfloat16, "float32")
    with pytest.raises(ConfigError, match="forgetting.dtype: float16 is not supported on CPU"):
        measuring_dtype(torch.float32, "float16", cpu)
    layer = torch.nn.Embedding(4, 2).to(torch.bfloat16)
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: layer
    model.extra = torch.nn.Linear(2, 2)  # an fp32 adapter beside bf16 base weights: the base's precision counts
    assert weights_dtype_of(model) == torch.bfloat16
