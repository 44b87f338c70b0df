import pytest

from kvrag.evaluation.systems import SystemSpecError, parse_systems


def test_full_parses() -> None:
    assert [s.name for s in parse_systems("full")] == ["full"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("fulll", "unknown system 'fulll'; known systems: full"),
     ("full,full", "listed twice: full"),
     ("full,", "empty system name"),
     ("full:0.5", "'full' takes no parameter")],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(SystemSpecError, match=message):
        parse_systems(spec)
