import dataclasses

import pytest

from srcid.config import apply_overrides, from_dict, valid_keys
from srcid.errors import SrcidError


@dataclasses.dataclass
class Inner:
    rate: float = 0.5
    levels: tuple = (8, 5)
    name: str = "x"


@dataclasses.dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_overrides_set_nested_typed_values():
    cfg = apply_overrides(Outer(), ["steps=7", "flag=true", "inner.rate=0.25", "inner.name=abc"])
    assert cfg.steps == 7 and cfg.flag is True and cfg.inner.rate == 0.25 and cfg.inner.name == "abc"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(SrcidError) as err:
        apply_overrides(Outer(), ["inner.speed=3"])
    message = str(err.value)
    assert "inner.speed" in message and "inner.rate" in message and "steps" in message


def test_bad_value_names_key():
    with pytest.raises(SrcidError, match="steps"):
        apply_overrides(Outer(), ["steps=ten"])
    with pytest.raises(SrcidError, match="key=value"):
        apply_overrides(Outer(), ["steps"])


def test_valid_keys_and_from_dict():
    assert set(valid_keys(Outer())) == {"steps", "flag", "inner.rate", "inner.levels", "inner.name"}
    cfg = from_dict(Outer, {"steps": 3, "inner": {"rate": 1.0}})
    assert cfg.steps == 3 and cfg.inner.rate == 1.0
    with pytest.raises(SrcidError, match="bogus"):
        from_dict(Outer, {"bogus": 1})
