"""What made a result: model fingerprints, and the keys that cached results are checked against.

A result kept on disk for reuse (``eval`` generations, ``ntk`` row chunks, a reproduced run) is
saved with a key: everything that determines it. ``check_key`` writes the key beside the
result on first use; a later run reuses the result only when its own key is equal, and is
otherwise refused with a message naming each setting that differs::

    key = {"model": model_fingerprint(args.model), "dtype": "float32", "max_new_tokens": 64}
    check_key(out / "generations" / "key.json", key, what="eval: the generations in 'out/'",
              remedy="use another --out, or --overwrite to replace them", about={"model": args.model})

A model's identity is its content, not its name: ``model_fingerprint`` hashes every file of
the resolved model directory (config, weights, tokenizer, chat template, custom code; not its
README or training records), so retrained weights in the same folder differ and a copied
folder matches. Hashing gigabytes of safetensors at every
run would cost seconds, so content hashes are cached under the dcr-fast cache
(``file-hashes.json``) keyed by each file's path, size, mtime and inode: an unchanged file is
hashed once.
``module_fingerprint`` hashes a model held in memory (its parameters), for API callers that
pass a model object rather than a name.

Left out of keys on purpose: settings that only move rounding (device, attention kernel, batch
size, where features are offloaded), so an interrupted run may resume on another device.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dcr_fast import atomic
from dcr_fast.models import cache_root, file_sha256, resolve

_HASHES = "file-hashes.json"
# Files of a model folder that say where it came from or how it was trained, not what it
# computes (dcr_fast_source.json is models.convert_gguf's record of the GGUF's path): left out,
# so the same model fingerprints the same on another machine. Any other file counts.
_PROVENANCE = frozenset({"README.md", "LICENSE", "LICENSE.txt", "training_args.bin", "trainer_state.json",
                         "dcr_fast_source.json"})


def model_fingerprint(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The content fingerprint of a model as ``dcr_fast.models.load`` would load it.

    ``{"sha256": one digest over all files, "files": {file name: sha256}}``; a hub id not yet
    downloaded can only be named (``{"hub_id": ...}``), so fingerprint after loading.
    """
    source = resolve(name_or_path)
    folder = Path(source) if Path(source).is_dir() else _hub_snapshot(source)
    if folder is None:
        return {"hub_id": source}
    files = directory_hashes(folder)
    return {"sha256": _digest(files), "files": files}


def directory_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every model file directly in ``folder`` (links followed; hidden and provenance
    files left out), by name; cached by stat."""
    folder = Path(folder)
    paths = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name not in _PROVENANCE)
    cache_file = _cache_file()
    cache = _read_cache(cache_file)
    hashes, changed = {}, False
    for path in paths:
        real = os.path.realpath(path)
        info = os.stat(real)
        stamp = [info.st_size, info.st_mtime_ns, info.st_ino]
        entry = cache.get(real)
        if entry is None or entry[:3] != stamp:
            entry = stamp + [file_sha256(real)]
            cache[real], changed = entry, True
        hashes[path.name] = entry[3]
    if changed:
        try:
            atomic.write_json(cache_file, {p: e for p, e in cache.items() if os.path.exists(p)}, indent=0)
        except OSError:  # a read-only cache costs a rehash next time, nothing else
            pass
    return hashes


def module_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The fingerprint of a model in memory: its class and ``parameters_sha256``."""
    return {"class": type(model).__name__, "parameters_sha256": parameters_sha256(model)}


def parameters_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes (tied weights once)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|".encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def text_sha256(text: str | None) -> str | None:
    """A short stand-in for a long setting (a chat template, a prompt list) in a key."""
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One entry per differing setting, nested keys dotted: ``max_new_tokens: 64 -> 8``."""
    found = []
    for name in sorted(set(saved) | set(current), key=str):
        label = f"{prefix}{name}"
        old, new = saved.get(name, _MISSING), current.get(name, _MISSING)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found += differences(old, new, f"{label}.")
        elif old != new:
            found.append(f"{label}: {_show(old)} -> {_show(new)}")
    return found


def check_key(path: str | os.PathLike, key: Mapping[str, Any], *, what: str, remedy: str,
              about: Mapping[str, Any] | None = None) -> None:
    """Record ``key`` at ``path``, or, when a key is already there, require it to equal ``key``.

    Raises ``ValueError`` naming every differing setting (``what`` says whose results these
    are, ``remedy`` what the user can do); ``about`` (e.g. the model's name as given) is saved
    beside the key for that message, but not compared.
    """
    path = Path(path)
    key = json.loads(json.dumps(key, default=str))  # as it will read back: tuples as lists
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = {}
        saved_key = saved.get("key", {}) if isinstance(saved, dict) else {}
        if saved_key != key:
            found = differences(saved_key, key)
            shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
            made = saved.get("about") if isinstance(saved, dict) else None
            made = f" (saved by a run with {_show(made)})" if made else ""
            raise ValueError(f"{what} were made with other settings{made}: {shown}; {remedy}")
        return
    atomic.write_json(path, {"key": key, "about": dict(about or {})}, indent=1)


class _Missing:
    def __repr__(self) -> str:
        return "(none)"


_MISSING = _Missing()


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}..."
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + "..." + text[-12:]


def _digest(files: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(files), sort_keys=True).encode()).hexdigest()


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model in the Hugging Face cache, if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _cache_file() -> Path:
    return cache_root() / _HASHES


def _read_cache(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
