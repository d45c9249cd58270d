"""Loads the compiled extension ``dcr_fast._C`` when it was built for the running torch.

Importing it registers the ``torch.ops.dcr_fast.*`` operators (``TORCH_LIBRARY`` in csrc/).
The package stays importable and correct without it: callers check :data:`HAS_EXTENSION` and
fall back to their pure-PyTorch reference, and :func:`require_extension` raises a clear error.

* Not built (a pure-Python install, ``DCR_FAST_NO_EXT=1``): silent.
* Built against another torch: torch's C++ ABI changes between releases, so the import fails
  (undefined symbols), or it succeeds and the torch version recorded at build time differs
  from the running one. Either way: one warning that names the fix, and the PyTorch paths.
  The usual cause is a build in an isolated environment with another torch than the one
  installed; ``pip install --no-build-isolation`` builds against the installed torch.
"""

from __future__ import annotations

import importlib
import re
import warnings

import torch

FIX = "pip install --no-build-isolation ."


def _load(import_module=importlib.import_module):
    """(the module, None) or (None, why it is not used); None as the reason: not built."""
    try:
        module = import_module("dcr_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name == "dcr_fast._C":
            return None, None
        return None, f"it failed to import ({exc})"
    except (ImportError, OSError) as exc:
        return None, f"it failed to load ({exc})"
    built = getattr(module, "built_with_torch", None)
    running = _release(torch.__version__)
    if built is not None and built != running:
        return None, f"it was built against torch {built}, and this is torch {running}"
    return module, None


def _release(version: str) -> str:
    """'2.13.0' of '2.13.0+cpu' or '2.14.0a0+git1234'."""
    found = re.match(r"\d+\.\d+\.\d+", version)
    return found.group(0) if found else version


_C, _REASON = _load()
HAS_EXTENSION = _C is not None
if _REASON is not None:
    warnings.warn(f"dcr_fast._C (the compiled extension) is not used: {_REASON}. dcr-fast runs its pure-PyTorch "
                  f"paths instead (same numbers, slower CPU Circle loss and eNTK probes). Rebuild it against "
                  f"this torch: `{FIX}` (add -e for a checkout).", RuntimeWarning, stacklevel=2)


def require_extension(what: str) -> None:
    if not HAS_EXTENSION:
        reason = _REASON or "it is not built"
        raise RuntimeError(f"{what} needs the compiled extension dcr_fast._C, which is not used: {reason}. "
                           f"Reinstall with `{FIX}` on a machine with a C++ compiler.")
