"""Profiles: one --set item that selects a named set of run-config settings (the authors' code)."""
import pytest

from srcid.errors import SrcidError
from srcid.run import PROFILES, build_parser, resolve_config
from srcid.train.warm_start import WarmStart


def resolve(tmp_path, *items):
    args = build_parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                      *[x for item in items for x in ("--set", item)]])
    return resolve_config(args)


def test_authors_profile_sets_every_authors_choice(tmp_path):
    config = resolve(tmp_path, "profile=authors")
    m = config.model
    assert config.profile == "authors"
    assert m.normalize_inputs is False and m.quantizer.init == "uniform" and m.quantizer.dead_code == "steps"
    assert m.quantizer.dead_code_source == "active_code" and m.video_specific == "head" and m.text_mask is False
    assert m.club.estimator == "sampled" and m.cpc.lstm_layers == 2 and m.weights.average_layers is False
    assert config.warm_start.mode == "epoch" and config.warm_start.switch_epoch == 3
    assert config.warm_start.epoch_layer2_weight == pytest.approx(0.3)
    assert m.text_target == "lstm" and m.layer2_detach_target is False and m.layer2_input_norm == "none"
    assert m.layer2_center is False
    assert m.club.standardize_y is False and m.club.logvar_range == 1.0 and config.warm_start.mi_rel_threshold == 0
    assert len(PROFILES["authors"]) == 19


def test_default_profile_changes_nothing_and_explicit_settings_win(tmp_path):
    plain = resolve(tmp_path)
    assert plain.profile == "default" and plain.model.normalize_inputs is True and plain.model.quantizer.init == "kmeans"
    # an explicit item wins over the profile's, whatever its position on the command line
    config = resolve(tmp_path, "model.normalize_inputs=true", "profile=authors")
    assert config.model.normalize_inputs is True and config.model.quantizer.init == "uniform"


def test_unknown_profile_lists_the_valid_ones(tmp_path):
    with pytest.raises(SrcidError, match="profile=bogus: choose one of default, authors"):
        resolve(tmp_path, "profile=bogus")


def test_a_renamed_key_in_set_is_one_line_naming_the_new_key(tmp_path):
    with pytest.raises(SrcidError) as caught:
        resolve(tmp_path, "warm_start.mi_layer2_weight=0.3")
    assert str(caught.value) == "config key warm_start.mi_layer2_weight: renamed to warm_start.layer2_loss_weight"
    config = resolve(tmp_path, "warm_start.layer2_loss_weight=0.3", "warm_start.mode=off")
    assert WarmStart(config.warm_start).layer2_weight == pytest.approx(0.3)  # layer 2's whole loss weight
    assert config.model.weights.mi_layer2 == 1.0  # the CLUB term's own factor is another key


def test_every_set_example_of_the_help_is_a_valid_setting():
    """`srcid train --help` (and `srcid study --help`) show --set examples: each must name a run-config key and a
    value the trainer accepts."""
    import re

    import srcid.cli
    from srcid.config import valid_keys
    from srcid.run import apply_profile_and_overrides, default_run_config

    commands = srcid.cli.build_parser()._subparsers._group_actions[0].choices
    texts = [build_parser().format_help(), commands["study"].format_help()]
    found = [m for text in texts for m in re.findall(r"--set ([A-Za-z_][\w.]*=[\w.\-]+)", " ".join(text.split()))]
    items = [item for item in found if item != "KEY=VALUE"]  # the flag's metavar
    assert len(items) >= 4, items  # the trainer's three and the study's profile=authors
    keys = set(valid_keys(default_run_config("srcid", "small")))
    for item in items:
        assert item.split("=", 1)[0] in keys, item
        apply_profile_and_overrides(default_run_config("srcid", "small"), [item])  # the value is accepted too
