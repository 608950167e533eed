"""forgetting.reference: every bounded-memory kind gives memory's numbers (exact kinds to 1e-6, topk:K within
the bound it reports); recompute is refused for methods without an adapter; a disk reference is written
once and read back by later runs and resumes."""

from __future__ import annotations

import shutil

import pytest
import torch

from forgetscale.cli import main
from forgetscale.config import ForgettingConfig, parse_config
from forgetscale.data import build_forgetting_blocks
from forgetscale.data.blocks import Blocks
from forgetscale.errors import ConfigError
from forgetscale.methods import METHODS
from forgetscale.methods.attach import attach
from forgetscale.metric import references
from forgetscale.metric.references import memory_reference
from forgetscale.metric.sums import score
from forgetscale.models import EMBEDDED, TINY, load_model
from forgetscale.runs import plan_runs
from forgetscale.sweep import run_sweep

TOL = 1e-6
CPU = torch.device("cpu")


def _blocks(vocab: int, n: int = 4, length: int = 48, seed: int = 0) -> Blocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # some positions not measured, as in chat data
    return Blocks(ids, labels, torch.ones_like(ids))


def _tuned(name: str, scale: float):
    """The base with a LoRA adapter whose B is non-zero, so the tuned model differs from the base."""
    base = load_model(name).model
    torch.manual_seed(0)
    model = attach(base, METHODS.get("lora")(ranks=[4]), 4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return model.eval()


def _all_kinds(model, blocks: Blocks, batch: int, folder, ks=(1, 16, 1024)) -> dict[str, dict[str, float]]:
    with model.disable_adapter():
        memory = memory_reference(model, blocks, batch, CPU)
        built = {"disk": references.build("disk", model, blocks, batch, CPU, None, folder),
                 "recompute": references.build("recompute", model, blocks, batch, CPU, None),
                 **{f"topk:{k}": references.build(f"topk:{k}", model, blocks, batch, CPU, None) for k in ks}}
    out = {"memory": score(model, blocks, batch, CPU, None, memory)}
    out.update({name: score(model, blocks, batch, CPU, None, ref) for name, ref in built.items()})
    return out


def _check(results: dict[str, dict[str, float]]) -> None:
    exact = results["memory"]
    assert exact["kl"] > 1e-3  # the adapter changed the model: the comparison is not of zeros
    for name, got in results.items():
        if name.startswith("topk"):
            error = exact["kl"] - got["kl"]
            # the coarsened KL is never above the exact one, and below it by at most the reported bound
            assert -TOL <= error <= got["kl_error_bound"] + TOL, (name, error, got["kl_error_bound"])
            assert abs((exact["ce"] - got["ce"]) - error) <= TOL  # CE = H + KL with H exact
            for key in ("entropy", "ce_hard", "nll"):
                assert abs(got[key] - exact[key]) <= TOL, (name, key)
        else:
            for key in ("ce", "kl", "ce_hard", "entropy", "nll"):
                assert abs(got[key] - exact[key]) <= TOL, (name, key, got[key], exact[key])


def test_every_kind_matches_memory_on_the_tiny_model(tmp_path):
    model = _tuned(TINY, 0.05)
    blocks = _blocks(model.config.vocab_size)
    results = _all_kinds(model, blocks, 3, tmp_path / "ref")  # batch 3 of 4 blocks: an uneven last batch
    _check(results)
    k1, k16, k1024 = (results[f"topk:{k}"] for k in (1, 16, 1024))
    assert k1["kl"] <= k16["kl"] + TOL and k16["kl"] <= k1024["kl"] + TOL  # a finer coarsening keeps more KL


@pytest.mark.slow
def test_every_kind_matches_memory_on_smollm2(tmp_path):
    model = _tuned(EMBEDDED, 0.01)
    tokenizer = load_model(TINY).tokenizer  # SmolLM2's own tokenizer
    blocks = build_forgetting_blocks(ForgettingConfig(max_tokens=256), tokenizer, 64, tmp_path / "data")
    results = _all_kinds(model, blocks, 2, tmp_path / "ref", ks=(16, 1024))
    _check(results)
    # on real text a real model's top 1024 hold nearly all the mass: the error is a small part of the KL
    assert results["memory"]["kl"] - results["topk:1024"]["kl"] < 0.05 * results["memory"]["kl"]


def test_topk_at_the_base_is_exactly_zero():
    model = _tuned(TINY, 0.0)  # B = 0: the tuned model is the base
    blocks = _blocks(model.config.vocab_size, n=2)
    ref = references.build("topk:8", model, blocks, 2, CPU, None)
    got = score(model, blocks, 2, CPU, None, ref)
    assert abs(got["kl"]) <= 1e-9 and got["kl_error_bound"] >= 0.0  # the bound holds, loosely, here too


def test_recompute_is_refused_for_methods_without_an_adapter(tiny_cfg, write_yaml, capsys):
    cfg = parse_config(tiny_cfg(method=["lora", "full"], forgetting={"reference": "recompute"}))
    with pytest.raises(ConfigError, match="forgetting.reference: recompute needs an adapter.*'full'"):
        plan_runs(cfg)
    path = write_yaml(tiny_cfg(method="top_layers", forgetting={"reference": "recompute"}))
    assert main(["sweep", str(path), "--out", str(path.parent / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("forgetscale: forgetting.reference: recompute needs an adapter")
    assert not (path.parent / "out" / "results.sqlite").exists()  # refused before anything was written


def test_bad_reference_mode_names_the_key(tiny_cfg):
    with pytest.raises(ConfigError, match="forgetting.reference: must be auto, memory, disk, recompute or topk:K"):
        parse_config(tiny_cfg(forgetting={"reference": "topk:0"}))


def test_exact_kinds_share_run_ids_and_topk_does_not(tiny_cfg):
    ids = {mode: [p.run_id for p in plan_runs(parse_config(tiny_cfg(forgetting={"reference": mode})))]
           for mode in ("auto", "memory", "disk", "recompute", "topk:64")}
    assert ids["auto"] == ids["memory"] == ids["disk"] == ids["recompute"]
    assert set(ids["topk:64"]).isdisjoint(ids["memory"])


def test_auto_picks_memory_while_it_fits_in_half_the_ram():
    assert references.choose("auto", 10**9, 8 * 10**9)[0] == "memory"
    mode, note = references.choose("auto", 5 * 10**9, 8 * 10**9)
    assert mode == "disk" and "auto" in note and "5.00 GB" in note
    assert references.choose("topk:4", 10**12, 10**9)[0] == "topk:4"  # an explicit mode is kept


def test_auto_checks_the_free_disk_before_choosing_disk():
    """A reference larger than half the RAM goes to disk only while its files fit in 90% of the free disk;
    then recompute (adapter methods); otherwise one line. An explicit disk that cannot fit is refused."""
    gb = 10**9
    assert references.choose("auto", 40 * gb, 24 * gb, 40 * gb, 65 * gb)[0] == "disk"
    mode, note = references.choose("auto", 70 * gb, 24 * gb, 70 * gb, 65 * gb)
    assert mode == "recompute" and "70.00 GB to write to disk, 65.0 GB free" in note
    assert references.choose("auto", 70 * gb, 24 * gb, 0, 1 * gb)[0] == "disk"  # already written: read back
    with pytest.raises(ConfigError, match=r"^forgetting.reference: auto: .* use topk:K .*; got 'auto'$"):
        references.choose("auto", 70 * gb, 24 * gb, 70 * gb, 65 * gb, can_recompute=False)
    with pytest.raises(ConfigError, match=r"^forgetting.reference: disk needs 70.0 GB .*; got 'disk'$"):
        references.choose("disk", 70 * gb, 24 * gb, 70 * gb, 65 * gb)


def test_disk_plan_counts_only_what_is_left_to_write(tmp_path):
    done, half = tmp_path / "references" / "forgetting-a", tmp_path / "references" / "heldout-b"
    done.mkdir(parents=True)
    (done / "meta.json").write_text("{}")
    leftover = half.with_name(half.name + ".tmp")
    leftover.mkdir()
    (leftover / "probs.f32").write_bytes(b"\0" * 4096)
    to_write, free = references.disk_plan({"forgetting": done, "heldout": half}, {"forgetting": 10, "heldout": 7})
    assert to_write == 7
    assert free >= shutil.disk_usage(tmp_path).free + 4096 - 10**6  # the leftover build counts as free


def test_disk_sweep_equals_memory_and_is_reused_on_resume(tiny_cfg, tmp_path):
    memory = run_sweep(parse_config(tiny_cfg(train={"threads": 1})), tmp_path / "memory", progress=False)
    cfg = parse_config(tiny_cfg(forgetting={"reference": "disk"}, train={"threads": 1}))
    disk = run_sweep(cfg, tmp_path / "disk", progress=False, only=["lora-r2"])  # one run, then stop
    folders = sorted((tmp_path / "disk" / "references").iterdir())
    assert [f.name.split("-")[0] for f in folders] == ["forgetting", "heldout"]
    stamps = {f: (f / "probs.f32").stat().st_mtime_ns for f in folders}
    disk = run_sweep(cfg, tmp_path / "disk", progress=False)  # the resume runs lora-r4 against the same files
    assert sorted((tmp_path / "disk" / "references").iterdir()) == folders  # no new key, no .tmp left
    assert {f: (f / "probs.f32").stat().st_mtime_ns for f in folders} == stamps  # read back, not rewritten
    assert disk.get_meta("reference").startswith("disk")
    keys = ("run_id", "step", "forget_ce", "forget_ce_hard", "forget_kl", "base_entropy", "ft_kl", "ft_loss")
    assert [[r[k] for k in keys] for r in disk.checkpoints()] == [[r[k] for k in keys] for r in memory.checkpoints()]
    assert memory.get_meta("reference").startswith("memory (auto")


def test_changing_between_exact_kinds_resumes_the_same_sweep(tiny_cfg, tmp_path):
    run_sweep(parse_config(tiny_cfg(train={"threads": 1}, method={"name": "lora", "ranks": [2]})), tmp_path,
              progress=False)
    cfg = parse_config(tiny_cfg(forgetting={"reference": "disk"}, train={"threads": 1},
                                method={"name": "lora", "ranks": [2]}))
    store = run_sweep(cfg, tmp_path, progress=False)  # nothing to do: the run is finished under either kind
    assert [r["status"] for r in store.runs()] == ["finished"]
    with pytest.raises(ConfigError, match="forgetting.reference: differs"):
        run_sweep(parse_config(tiny_cfg(forgetting={"reference": "topk:8"}, train={"threads": 1},
                                        method={"name": "lora", "ranks": [2]})), tmp_path, progress=False)


def test_disk_read_buffer_is_reused_and_not_pickled(tmp_path):
    """The disk reference reads every batch into one buffer (page-locked for a GPU); a process that receives
    the reference allocates its own, and a truncated file is named."""
    import pickle

    import numpy as np

    from forgetscale.metric.references import ReadBuffer

    table = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    table.tofile(tmp_path / "probs.f32")
    buffer = ReadBuffer()
    first = buffer.read(tmp_path / "probs.f32", 1 * 3, 2, 3, torch.device("cpu"))
    assert first.tolist() == table[1:3].tolist()
    held = buffer.data
    second = buffer.read(tmp_path / "probs.f32", 3 * 3, 2, 3, torch.device("cpu"))
    assert second.tolist() == table[3:5].tolist() and buffer.data is held
    assert pickle.loads(pickle.dumps(buffer)).data is None
    with pytest.raises(RuntimeError, match="truncated"):
        buffer.read(tmp_path / "probs.f32", 4 * 3, 2, 3, torch.device("cpu"))
