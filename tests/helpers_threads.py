"""``one_thread``: a module-scoped autouse fixture that runs a test module on one torch thread.

Tiny models train faster on one thread, and far faster when the cores are shared with other
test processes. A module opts in with ``from helpers_threads import one_thread  # noqa: F401``
(pytest finds fixtures among a module's globals).
"""

import pytest

from dcr_fast.train.common import torch_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield
