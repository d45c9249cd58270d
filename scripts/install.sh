#!/usr/bin/env bash
# Installs dcr-fast (building its C++ extension), the built-in model's packages and the test dependencies into the current
# Python. Keeps an already-installed torch (a GPU machine's CUDA build); otherwise installs
# the CPU build 2.13.0, which `pip` takes from local disk on our machines.
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# The extension builds against the torch above, so the build must not be isolated.
python -m pip install -q "setuptools>=69" wheel ninja pybind11
python -m pip install -q --no-build-isolation -e ".[test,models]"
python -c "import dcr_fast, dcr_fast._extension as e; print('dcr-fast', dcr_fast.__version__, '| extension built:', e.HAS_EXTENSION)"
