"""Load a causal language model and its tokenizer, offline.

A model is named by one string: a local Hugging Face model directory, a ``.gguf``
file (dequantised through transformers' GGUF support), or the alias of a packaged
model (``smollm2-135m``, the default). GGUF files are converted once into a cached
Hugging Face directory, so later loads take seconds and the model can be saved with
``save_pretrained`` like any other.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from evosearch import assets
from evosearch.errors import EvosearchError

log = logging.getLogger("evosearch")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None, field: str = "--device") -> torch.device:
    """The device `device` names (None: `default_device`), checked here once for every command: a
    CUDA device this machine lacks is one line naming `field`, not torch's AssertionError when the
    first tensor moves."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvosearchError(f"{field} {device}: not a device; use cpu, cuda or cuda:N") from None
    if resolved.type != "cuda":
        return resolved
    count = torch.cuda.device_count()
    if count == 0:
        why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None and
               torch.version.hip is None else "no CUDA device is visible")
        raise EvosearchError(f"{field} {device}: this machine has no CUDA GPU ({why}); use {field} cpu")
    if resolved.index is not None and resolved.index >= count:
        gpus = "1 CUDA GPU, cuda:0" if count == 1 else f"{count} CUDA GPUs, cuda:0 to cuda:{count - 1}"
        raise EvosearchError(f"{field} {device}: this machine has {gpus}; use one of them or {field} cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU (where bf16 matmuls are slow), unless told otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EvosearchError(f"dtype {dtype!r} is not known; use one of {', '.join(sorted(set(DTYPES)))} or auto")
    return DTYPES[dtype]


def resolve_model_path(source: str | Path | None) -> Path:
    """The local Hugging Face directory a model name stands for (converting GGUF files once)."""
    if source is None or str(source) in assets.PACKAGED_MODELS:
        packaged = assets.PACKAGED_MODELS[str(source or assets.DEFAULT_MODEL)]
        return _converted_gguf(assets.packaged_model_gguf(packaged))
    path = Path(source).expanduser()
    if not path.exists():
        raise EvosearchError(
            f"model {str(source)!r} does not exist; pass a local Hugging Face model directory, a .gguf file, "
            f"or a packaged model ({', '.join(assets.PACKAGED_MODELS)})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EvosearchError(f"model file {path} is not a .gguf file; pass a model directory or a GGUF file")
        return _converted_gguf(path)
    if (path / "config.json").exists():
        _check_model_files(path)
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _converted_gguf(ggufs[0])
    if ggufs:
        raise EvosearchError(f"{path} is not a model directory: it has no config.json and {len(ggufs)} .gguf files "
                             f"(name one)")
    inner = sorted(p.name for p in path.iterdir() if (p / "config.json").exists())
    raise EvosearchError(
        f"{path} is not a model directory: it has no config.json and no .gguf file; pass "
        + (f"its subfolder {path / inner[0]}" if inner else "a folder holding config.json, the weights and the "
                                                            "tokenizer (save_pretrained writes them)"))


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# A tokenizer is its tokenizer.json or vocabulary files (vocab.json and merges.txt, vocab.txt, a SentencePiece
# *.model...); tokenizer_config.json alone only configures one, and with nothing transformers makes an empty one.
VOCABULARY_FILES = ("tokenizer.json", "vocab.*", "merges.txt", "*.model", "*.tiktoken")


def _check_model_files(path: Path) -> None:
    """Name what a model folder lacks, rather than the loader's first complaint about it."""
    missing = []
    if not any((path / name).exists() for name in WEIGHT_FILES):
        missing.append("no weights (model.safetensors, pytorch_model.bin or a sharded *.index.json)")
    if not any(any(path.glob(pattern)) for pattern in VOCABULARY_FILES):
        missing.append("no tokenizer (tokenizer.json, or vocabulary files such as vocab.json and merges.txt, "
                       "vocab.txt or tokenizer.model)")
    if missing:
        raise EvosearchError(f"model folder {path} has config.json but {' and '.join(missing)}; save the model and "
                             f"its tokenizer into it with save_pretrained")


def load_model(source: str | Path | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None):
    """Load ``(model, tokenizer)`` for inference: eval mode, no gradients, on ``device``.

    ``source`` is a local Hugging Face directory, a GGUF file, or a packaged model alias;
    ``None`` means the packaged default (SmolLM2-135M-Instruct). Sub-networks exported by
    evosearch load with evosearch's own modeling code (no ``trust_remote_code``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _register_exported_classes()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise EvosearchError(f"could not load a causal LM from {path}: {_first_line(exc)}") from None
    model.to(device).eval().requires_grad_(False)
    log.info("loaded %s (%s, %.1fM parameters, %s, %s)", source or assets.DEFAULT_MODEL,
             type(model).__name__, model.num_parameters() / 1e6, dtype, device)
    return model, tokenizer


def load_config(source: str | Path | None = None):
    """The (text) configuration of the model ``source`` names, without its weights: what checks
    of the settings against the model read before the model is loaded."""
    from transformers import AutoConfig

    _register_exported_classes()
    path = resolve_model_path(source)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise EvosearchError(f"could not read the model's configuration {path / 'config.json'}: "
                             f"{_first_line(exc)}") from None
    return config.get_text_config()


def check_context(config, length: int, flag: str) -> None:
    """Refuse sequences longer than the model's context (learned positions fail on them, rotary ones degrade)."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and length > context:
        raise EvosearchError(f"{flag} {length} exceeds the model's context of {context} tokens "
                             f"(max_position_embeddings); lower {flag} to at most {context}")


def vocab_size(model) -> int:
    """The token ids the model's input embedding holds."""
    return model.get_input_embeddings().num_embeddings


def _register_exported_classes() -> None:
    """Exports whose blocks differ name evosearch's Llama (``model_type: evosearch_llama``);
    load them with evosearch's own copy of its code, never the file beside the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evosearch.modeling_evosearch import EvosearchLlamaConfig, EvosearchLlamaForCausalLM

    AutoConfig.register(EvosearchLlamaConfig.model_type, EvosearchLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(EvosearchLlamaConfig, EvosearchLlamaForCausalLM, exist_ok=True)


def _converted_gguf(gguf: Path) -> Path:
    """A Hugging Face copy of a GGUF model, made once and cached.

    A model loaded from GGUF refuses ``save_pretrained`` (it carries a GGUF quantization
    config), so the dequantised weights are moved into a model built from the plain config.
    The copy keeps the dequantised values exactly (float32).
    """
    import transformers

    stat = gguf.stat()
    # Keyed by transformers' major version too: a tokenizer saved by transformers 5 names a class
    # (TokenizersBackend) that transformers 4 cannot load, and the other way round.
    major = transformers.__version__.split(".")[0]
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{major}".encode()).hexdigest()[:16]
    target = assets.cache_dir() / "converted" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a Hugging Face directory (once; later loads are fast)", gguf.name)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:
        raise EvosearchError(f"reading GGUF files needs the gguf package: pip install 'evosearch[gguf]' "
                             f"({_first_line(exc)})") from None
    except Exception as exc:  # the GGUF reader raises many kinds of errors on a damaged file
        raise EvosearchError(f"{gguf} is not a readable GGUF model: {_first_line(exc)}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def model_fingerprint(model) -> str:
    """A short digest of a model's configuration and weights, to key caches built from it."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            stats = torch.stack([param.double().sum(), param.double().abs().sum(), param.flatten()[::997].double().sum()])
            digest.update(f"{name}:{tuple(param.shape)}:{stats.tolist()}".encode())
    return digest.hexdigest()[:16]
