import dataclasses
from typing import Literal, Optional

import pytest

from srcid.config import apply_overrides, from_dict, to_dict, valid_keys
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


def test_absent_keys_get_the_value_the_saved_file_meant():
    from srcid.config import with_absent_keys

    saved = {"a": 1, "club": {"hidden": 8}, "quantizer": {"init": "kmeans"}}
    filled = with_absent_keys(saved, {"text_target": "lstm", "club.logvar_range": 1.0, "quantizer.init": "uniform",
                                      "cpc.lstm_layers": 2})
    assert filled == {"a": 1, "text_target": "lstm", "club": {"hidden": 8, "logvar_range": 1.0},
                      "quantizer": {"init": "kmeans"}}  # a key present stays; a missing parent is left alone
    assert saved == {"a": 1, "club": {"hidden": 8}, "quantizer": {"init": "kmeans"}}  # the input is not changed


def test_a_run_config_saved_before_the_relative_trigger_keeps_the_absolute_one(tmp_path):
    import json

    from srcid.run import default_run_config, load_run_config

    config = default_run_config("srcid", "tiny")
    data = to_dict(config)
    del data["warm_start"]["mi_rel_threshold"], data["model"]["text_target"]
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(data))
    loaded = load_run_config(path)
    assert loaded.warm_start.mi_rel_threshold == 0.0 and loaded.model.text_target == "lstm"
    assert loaded.warm_start.window_steps == config.warm_start.window_steps  # a key present is read as saved


def test_a_run_config_with_a_renamed_key_is_one_line_naming_the_new_key(tmp_path):
    import json

    from srcid.run import default_run_config, load_run_config

    data = to_dict(default_run_config("srcid", "tiny"))
    data["warm_start"]["mi_layer2_weight"] = data["warm_start"].pop("layer2_loss_weight")
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SrcidError) as caught:
        load_run_config(path)
    assert str(caught.value) == f"{path}: config key warm_start.mi_layer2_weight: renamed to warm_start.layer2_loss_weight"


@dataclasses.dataclass
class Choices:
    mode: Literal["mi", "epoch", "off"] = "mi"
    level: Literal[1, 2] = 1
    maybe: Optional[Literal["a", "b"]] = None


def test_a_literal_key_lists_its_choices():
    cfg = apply_overrides(Choices(), ["mode=epoch", "level=2", "maybe=b"])
    assert (cfg.mode, cfg.level, cfg.maybe) == ("epoch", 2, "b")
    for item, message in (("mode=bogus", "config key mode: 'bogus' is not one of mi, epoch, off"),
                          ("level=3", "config key level: '3' is not one of 1, 2"),
                          ("maybe=c", "config key maybe: 'c' is not one of a, b")):
        with pytest.raises(SrcidError) as err:
            apply_overrides(Choices(), [item])
        assert str(err.value) == message
