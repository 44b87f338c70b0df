"""Small corpus-in-context instances: short prompts keep training tests fast."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvrag.data.schema import Doc, Instance


def make_instances(n: int) -> list[Instance]:
    out = []
    for i in range(n):
        docs = [Doc(f"d{i}-{j}", f"Town {j}", f"Person {i}{j} was born in Town {j} in "
                f"19{10 + j}. The town is known for its {['mills', 'bridges', 'fairs'][j]}.")
                for j in range(3)]
        out.append(Instance(f"q{i}", f"Where was Person {i}1 born?", ["Town 1"], docs,
                            [f"d{i}-1"]))
    return out


@pytest.fixture(scope="session")
def small_instances() -> Callable[[int], list[Instance]]:
    return make_instances
