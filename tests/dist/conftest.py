from __future__ import annotations

import pytest
from harness import DistPool


@pytest.fixture(scope="module")
def pool():
    p = DistPool(world=4)
    yield p
    p.close()
