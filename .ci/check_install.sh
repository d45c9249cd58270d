#!/usr/bin/env bash
# Installs dcr-fast as a user does: `pip install .`, non-editable, with pip's default isolated
# build, into a fresh virtual environment that has only the torch CI runs; then checks that the
# compiled extension was built against that torch, loads, and runs an op.
# Why the isolated build does not download another torch: build_backend/dcr_fast_build.py.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH="torch==$(python -c 'import torch; print(torch.__version__)')"  # CI's torch (the CPU 2.13.0 lies on disk)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
start=$SECONDS
"$PY" -m pip install -q "$TORCH"
"$PY" -m pip install -q .
echo "check_install: $TORCH and pip install . took $((SECONDS - start)) s"
# From outside the checkout, so that the installed package is the one imported.
cd "$WORK"
"$PY" -W error::RuntimeWarning - <<'PY'
import torch
import dcr_fast
from dcr_fast import _extension

assert "site-packages" in dcr_fast.__file__, dcr_fast.__file__
assert _extension.HAS_EXTENSION, "dcr_fast._C did not load in the installed package"
s = torch.randn(3, 5, dtype=torch.float64)
labels, ref_labels = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0, 1, 2])
lse_p, lse_n = torch.ops.dcr_fast.circle_rows_lse(s, labels, ref_labels, 0, False, 1.4, -0.4, 0.6, 0.4, 80.0)
assert torch.isfinite(lse_p).all() and torch.isfinite(lse_n).all()
loss = dcr_fast.CircleLoss()(torch.randn(16, 8), torch.randint(0, 3, (16,)))
print(f"check_install: dcr_fast {dcr_fast.__version__} from {dcr_fast.__file__}; extension built with torch",
      _extension._C.built_with_torch, "| loss", float(loss))
PY
