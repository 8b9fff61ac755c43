import pytest

# The seeded random SNAC weights (noise off), written once per run and shared by every
# test that decodes: ``snac_weights`` (the directory) and ``snac_model`` (loaded on CPU).
from tests.conftest_snac import snac_model, snac_weights  # noqa: F401


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
