import pytest

from forgetscale.config import load_config, parse_config
from forgetscale.errors import ConfigError
from forgetscale.sweep import plan_runs


def test_defaults_are_the_papers_choices():
    cfg = parse_config({})
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.train.optimizer == "adafactor"
    spec = cfg.methods[0]
    assert spec.name == "lora" and spec.scaling == "rslora"
    assert spec.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_log_spaced_checkpoints_include_zero_and_last():
    cfg = parse_config({"train": {"steps": 64, "num_checkpoints": 7}})
    assert cfg.train.checkpoint_steps == [0, 1, 2, 4, 8, 16, 32, 64]
    cfg = parse_config({"train": {"steps": 10, "checkpoints": [5, 3]}})
    assert cfg.train.checkpoint_steps == [0, 3, 5, 10]


def test_warmup_default_is_short():
    assert parse_config({"train": {"steps": 260}}).train.warmup == 13
    assert parse_config({"train": {"steps": 4}}).train.warmup == 1


def test_method_shorthands_and_lists():
    cfg = parse_config({"method": [{"name": "lora", "ranks": [1, 2]}, {"name": "full"}, "ia3"]})
    assert [m.name for m in cfg.methods] == ["lora", "full", "ia3"]
    labels = [p.label for p in plan_runs(cfg)]
    assert labels == ["lora-r1", "lora-r2", "full", "ia3"]


def test_run_ids_are_stable_and_ignore_bookkeeping_keys():
    a = plan_runs(parse_config({"train": {"eval_batch_size": 4}}))
    b = plan_runs(parse_config({"train": {"eval_batch_size": 16, "save_adapters": "all"}}))
    c = plan_runs(parse_config({"train": {"lr": 0.5}}))
    assert a[0].run_id == b[0].run_id
    assert a[0].run_id != c[0].run_id


def test_seeds_expand_runs():
    cfg = parse_config({"method": {"name": "lora", "ranks": [2, 4]}, "train": {"seeds": [0, 1, 2]}})
    plans = plan_runs(cfg)
    assert len(plans) == 6 and len({p.run_id for p in plans}) == 6


def test_overrides_apply_on_top_of_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 10\n  lr: 0.1\n")
    cfg = load_config(path, {"train.steps": 20, "train.lr": None, "model": "tiny-random-llama"})
    assert cfg.train.steps == 20 and cfg.train.lr == 0.1 and cfg.model.name == "tiny-random-llama"


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("train:\n  steps: 0\n", "c.yaml:2 train.steps: input should be greater than 0; got 0"),
        ("train:\n  stpes: 5\n", "c.yaml:2 train.stpes: unknown key"),
        ("method:\n  name: lora\n  ranks: [8, 0]\n", "c.yaml:3 method.ranks: each rank must be >= 1"),
        ("method:\n  name: lroa\n", "c.yaml:2 method.name: unknown method 'lroa'; did you mean 'lora'?"),
        ("train:\n  steps: 10\n  checkpoints: [0, 20]\n",
         "c.yaml:3 train.checkpoints: each must be between 0 and train.steps=10; got 20"),
        ("finetune:\n  heldout_fraction: 1.5\n", "c.yaml:2 finetune.heldout_fraction: input should be less than 0.9"),
        ("bogus: 1\n", "c.yaml:1 bogus: unknown key"),
        ("train: [\n", "c.yaml:2: not valid YAML"),
        ("- a\n- b\n", "c.yaml: must be a YAML mapping"),
        ("method:\n  - name: lora\n    alpah: 3\n", "c.yaml:3 method[0].alpah: unknown key"),
    ],
)
def test_errors_name_the_key_and_line(tmp_path, yaml_text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value).replace(str(tmp_path) + "/", "")
    assert message.startswith(expected), message
    assert "\n" not in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_an_empty_config_file_is_one_line_not_a_default_sweep(tmp_path, capsys):
    """An empty (or comments-only) file is more likely a failed save than a wish for minutes of defaults."""
    from forgetscale.cli import main
    from forgetscale.config import load_config

    for text in ("", "# only a comment\n"):
        path = tmp_path / "sweep.yaml"
        path.write_text(text)
        assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "empty config (no keys)" in err[0] and str(path) in err[0]
        assert not (tmp_path / "out").exists()
    path.write_text("{}\n")  # every default, said explicitly
    assert load_config(path).model.name == "smollm2-135m-instruct"
