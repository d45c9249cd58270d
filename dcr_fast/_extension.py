"""Loads the compiled extension ``dcr_fast._C`` if it was built.

Importing it registers the ``torch.ops.dcr_fast.*`` operators (``TORCH_LIBRARY`` in csrc/).
The package stays importable without a build: callers check :data:`HAS_EXTENSION` and fall
back to their pure-PyTorch reference, and :func:`require_extension` raises a clear error.
"""

try:
    from dcr_fast import _C  # noqa: F401  (import registers the ops)

    HAS_EXTENSION = True
    _IMPORT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    HAS_EXTENSION = False
    _IMPORT_ERROR = exc


def require_extension(what: str) -> None:
    if not HAS_EXTENSION:
        raise RuntimeError(
            f"{what} needs the compiled extension dcr_fast._C, which failed to import "
            f"({_IMPORT_ERROR}). Reinstall with `pip install --no-build-isolation -e .` "
            "on a machine with a C++ compiler."
        )
