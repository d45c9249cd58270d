"""Shared test setup: Triton runs in interpreter mode on GPU-less machines, seeds are fixed,
and ``gpu``-marked tests skip without CUDA."""

import os
import random

import torch

# Must happen before anything imports triton: the CPU interpreter runs every kernel in CI.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Runs a test module on one torch thread (opt in with ``usefixtures``): tiny models train
    faster that way, and far faster when the cores are shared with other processes."""
    from dcr_fast.runtime import torch_threads

    with torch_threads(1):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str) -> None:
    """allclose with a message that says where and by how much it failed."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if actual.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off; max abs err {err.max():.3e} "
            f"(atol {atol:g}, rtol {rtol:g}); first at {idx}: {actual[idx].item():.8g} vs {expected[idx].item():.8g}"
        )
