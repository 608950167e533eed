"""model.init: random, the shape checks' models (benchmarks/gpu_check.py): a config with no weights, drawn on the
run's device from a fixed seed, so a sweep's runs and its base reference see the same weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetscale.config import parse_config
from forgetscale.models import TINY, load_model, model_identity, resolve_source
from forgetscale.runs import plan_runs
from forgetscale.store import Store
from forgetscale.sweep import run_sweep
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_only(tmp_path_factory) -> Path:
    """The tiny Llama's config and tokenizer, without its weights."""
    folder = tmp_path_factory.mktemp("shape") / "llama-shape"
    source = Path(resolve_source(TINY)[0])
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    return folder


def test_random_weights_are_the_same_whatever_the_global_seed(config_only):
    torch.manual_seed(1)
    a = load_model(str(config_only), init="random").model
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = load_model(str(config_only), init="random").model
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched (a run seeds its own)
    assert a.config.num_hidden_layers == 3  # the config's shape, not the tiny model's
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_a_random_sweep_measures_zero_at_step_0_and_is_keyed_apart(config_only, tmp_path):
    cfg = parse_config(tiny_config(model={"name": str(config_only), "init": "random"},
                                   method={"name": "lora", "ranks": [2]}))
    run_sweep(cfg, tmp_path / "run", progress=False)
    with Store(tmp_path / "run", create=False) as store:
        rows = {r["step"]: r for r in store.checkpoints()}
    assert rows[0]["forget_kl"] == 0.0 and rows[4]["forget_kl"] > 0
    assert model_identity(cfg, torch.device("cpu"))["init"] == "random"
    pretrained = parse_config(tiny_config(method={"name": "lora", "ranks": [2]}))
    assert "init" not in pretrained.to_dict()["model"]  # run ids stored before the key existed stay valid
    assert plan_runs(pretrained)[0].run_id != plan_runs(cfg)[0].run_id


def test_random_init_refuses_quantization_and_gguf():
    with pytest.raises(Exception, match="init: random draws plain weights"):
        parse_config(tiny_config(model={"name": "x", "init": "random", "quantization": "4bit"}))
    with pytest.raises(Exception, match="init: random draws plain weights"):
        parse_config(tiny_config(model={"name": "m.gguf", "init": "random"}))


def test_gpu_check_rehearses_on_cpu(tmp_path):
    """The GPU check's own code paths (sweep, measuring per reference kind) at tiny shapes on CPU, so the script
    that only a GPU session runs does not rot between sessions."""
    script = ROOT / "benchmarks" / "gpu_check.py"
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(script), "--export-inputs", str(tmp_path / "inputs")], check=True, env=env,
                   capture_output=True)
    done = subprocess.run([sys.executable, str(script), "--inputs", str(tmp_path / "inputs"), "--device", "cpu",
                           "--scale", "smoke", "--sections", "train,measure", "--steps", "4",
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert "errors" not in figures, figures.get("errors")
    assert figures["train"]["kl_step0"] == 0.0
    assert {kind: figures["measure"][kind]["kl_step0"] for kind in ("memory", "disk", "recompute")} == {
        "memory": 0.0, "disk": 0.0, "recompute": 0.0}
