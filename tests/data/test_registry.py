import pytest

import kvrag.data.loaders  # noqa: F401  (registers every format)
from kvrag.data.registry import LOADERS, register_loader


def test_every_format_registers_once_under_its_name():
    assert {"kvrag", "helmet", "infinitebench", "longbench-v2", "loft"} <= set(LOADERS)
    with pytest.raises(ValueError, match="dataset loader 'kvrag' is already registered"):
        register_loader("kvrag")(lambda path: [])
    assert LOADERS["kvrag"] is kvrag.data.loaders.load_kvrag
