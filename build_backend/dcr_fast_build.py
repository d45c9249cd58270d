"""setuptools' PEP 517 build backend, with torch added to the isolated build environment at the
release that will run the extension.

``pip install .`` (and ``-e .``, ``pip wheel .``) builds in an isolated environment from the
build requirements. An unpinned ``torch`` there is the newest release pip can find: measured
on our CI machine (torch 2.13.0+cpu installed, nvcc present, no GPU), 3 min 20 s to install
torch 2.14.1 with its CUDA 13 libraries (~3 GB) into the build environment, then a CUDA build
that torch aborts without a visible GPU, and even a successful build would have been compiled
against torch 2.14 for a 2.13 runtime (torch's C++ ABI changes between releases: undefined
symbols at import). So the build environment gets ``torch==<release of the installed torch>``:
the same release (the CPU 2.13.0 wheel, from local disk here), whose ABI the extension then
matches. With no torch installed, where pip installs, the requirement is unpinned and
pip installs that same newest torch as a dependency too.

pip runs these hooks with the target environment's interpreter but hides its site-packages;
``python -I`` (isolated mode: no PYTHONPATH, no user site) sees them again. Installs into
another prefix (``--target``, ``--prefix``, ``--user``) read the interpreter's torch.
``--no-build-isolation`` skips all of this and builds against the torch already installed.
"""

from __future__ import annotations

import re
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (build_wheel, build_editable, build_sdist, ...)

UNPINNED = "torch>=2.4"


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + [torch_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + [torch_requirement()]


def torch_requirement() -> str:
    """``torch==X.Y.Z`` for the torch installed where pip installs, else :data:`UNPINNED`.

    The public release only: ``==2.13.0`` also matches local builds (``2.13.0+cpu``,
    ``2.13.0+cu130``) wherever pip's indexes have them, and pip prefers those."""
    version = installed_torch_version()
    release = re.match(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?", version or "")
    return f"torch=={release.group(0)}" if release else UNPINNED


def installed_torch_version() -> str | None:
    probe = "from importlib.metadata import version; print(version('torch'))"
    try:
        done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:  # no torch there
        return None
    return done.stdout.strip() or None
