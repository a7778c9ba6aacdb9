from __future__ import annotations

import pytest
from harness import DistPool


@pytest.fixture(scope="session")
def pool():
    """One pool of 4 gloo ranks for every module: each start of 4 ranks costs seconds of
    imports on 2 cores, and the cases do not depend on a fresh process (the harness restores
    the environment after each case and restarts the pool after a failed one)."""
    p = DistPool(world=4)
    yield p
    p.close()
