import json
import math

import numpy as np
import pytest

from srcid.config import apply_overrides
from srcid.errors import SrcidError
from srcid.train.warm_start import WarmStart, WarmStartConfig

STEPS_PER_EPOCH = 200
EVERY = 10  # logging interval: observations every 10 steps


def reference_switch_step(steps, epochs, values, threshold, window, patience, min_epoch):
    """Brute-force MI trigger: first observation where the smoothed value has stayed below since >= patience steps."""
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    smoothed = np.array([values[(steps > s - window) & (steps <= s)].mean() for s in steps])
    below = (smoothed < threshold) & (np.asarray(epochs) >= min_epoch)
    for i in range(len(steps)):
        if not below[i]:
            continue
        start = i
        while start > 0 and below[start - 1]:
            start -= 1
        if steps[i] - steps[start] >= patience:
            return int(steps[i]), float(smoothed[i])
    return None, None


def run(warm, steps, values, stop_at=None):
    """Feed observations; return the layer-2 weight seen after each one."""
    weights = []
    for step, value in zip(steps, values):
        if stop_at is not None and step >= stop_at:
            break
        epoch = step // STEPS_PER_EPOCH
        if step % STEPS_PER_EPOCH == 0:
            warm.start_epoch(step, epoch)
        warm.observe(step, epoch, value)
        weights.append(warm.layer2_weight)
    return weights


def noisy_decay(seed, n_steps=3000, scale=2.0, tau=400.0, noise=0.08):
    rng = np.random.default_rng(seed)
    steps = np.arange(0, n_steps, EVERY)
    values = scale * np.exp(-steps / tau) + rng.normal(0.0, noise, size=steps.size)
    return [int(s) for s in steps], [float(v) for v in values]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mi_trigger_with_noise_switches_exactly_when_reference_says(seed):
    config = WarmStartConfig(mode="mi", mi_threshold=0.05, mi_rel_threshold=0.0, window_steps=100,
                             patience_steps=300, mi_min_epoch=1, fallback_epoch=None)
    steps, values = noisy_decay(seed)
    warm = WarmStart(config)
    weights = run(warm, steps, values)
    expected_step, expected_smoothed = reference_switch_step(
        steps, [s // STEPS_PER_EPOCH for s in steps], values, 0.05, 100, 300, 1)
    assert expected_step is not None
    # the noise takes raw values below the threshold (and below 0) long before the switch
    first_raw_below = next(s for s, v in zip(steps, values) if v < 0.05)
    assert first_raw_below < expected_step - 300
    assert min(values) < 0
    record = warm.switch_record
    assert record["step"] == expected_step
    assert record["epoch"] == expected_step // STEPS_PER_EPOCH
    assert math.isclose(record["smoothed_mi"], expected_smoothed, rel_tol=1e-12, abs_tol=1e-12)
    assert "MI trigger" in record["reason"]
    switch_index = steps.index(expected_step)
    assert all(w == 0.0 for w in weights[:switch_index])
    assert all(w == 1.0 for w in weights[switch_index:])


def test_patience_resets_when_the_smoothed_value_goes_back_up():
    config = WarmStartConfig(mi_threshold=0.05, window_steps=30, patience_steps=100, mi_min_epoch=0,
                             fallback_epoch=None)
    steps = list(range(0, 1000, EVERY))
    # low from step 0, a spike at step 80 (breaks the run for 3 observations), low again
    values = [1.0 if s == 80 else 0.0 for s in steps]
    warm = WarmStart(config)
    run(warm, steps, values)
    # below at 0..70, above at 80, 90, 100 (spike inside the 30-step window), below again from 110
    assert warm.switch_record["step"] == 110 + 100
    expected, _ = reference_switch_step(steps, [0] * len(steps), values, 0.05, 30, 100, 0)
    assert expected == 210


def test_mi_trigger_waits_for_min_epoch_and_ignores_nan():
    config = WarmStartConfig(mi_threshold=0.05, window_steps=20, patience_steps=50, mi_min_epoch=1,
                             fallback_epoch=None)
    steps = list(range(0, 600, EVERY))
    values = [0.0 for _ in steps]
    values[steps.index(STEPS_PER_EPOCH + 30)] = float("nan")
    warm = WarmStart(config)
    run(warm, steps, values)
    # patience counting starts at epoch 1 (step 200), the NaN at 230 restarts it at 240
    assert warm.switch_record["step"] == 240 + 50


def test_epoch_mode_follows_the_fixed_schedule():
    config = WarmStartConfig(mode="epoch", switch_epoch=3, epoch_layer2_weight=0.3)
    warm = WarmStart(config)
    steps = list(range(0, 5 * STEPS_PER_EPOCH, EVERY))
    weights = run(warm, steps, [0.0] * len(steps))  # MI values play no part
    for step, weight in zip(steps, weights):
        assert weight == (0.3 if step >= 3 * STEPS_PER_EPOCH else 0.0)
    assert warm.switch_record["step"] == 3 * STEPS_PER_EPOCH
    assert warm.switch_record["epoch"] == 3
    assert "switch_epoch 3" in warm.switch_record["reason"]


def test_off_mode_is_on_from_the_start():
    warm = WarmStart(WarmStartConfig(mode="off"))
    assert warm.switched and warm.layer2_weight == 1.0
    assert warm.switch_record["step"] == 0
    warm.observe(0, 0, 5.0)
    assert warm.layer2_weight == 1.0


def test_fallback_epoch_and_fallback_step():
    steps = list(range(0, 6 * STEPS_PER_EPOCH, EVERY))
    warm = WarmStart(WarmStartConfig(fallback_epoch=3, fallback_step=None))
    run(warm, steps, [1.0] * len(steps))
    record = warm.switch_record
    assert record["step"] == 3 * STEPS_PER_EPOCH and "fallback" in record["reason"] and "epoch 3" in record["reason"]
    assert warm.layer2_weight == 1.0

    warm = WarmStart(WarmStartConfig(fallback_epoch=None, fallback_step=455))
    run(warm, steps, [1.0] * len(steps))
    assert warm.switch_record["step"] == 460 and "step 455" in warm.switch_record["reason"]

    warm = WarmStart(WarmStartConfig(fallback_epoch=None, fallback_step=None))
    run(warm, steps, [1.0] * len(steps))
    assert not warm.switched and warm.switch_record is None and warm.layer2_weight == 0.0


@pytest.mark.parametrize("stop_at", [150, 900, 1500, 2990])
def test_state_dict_round_trip_resumes_identical_decisions(stop_at):
    config = WarmStartConfig(window_steps=100, patience_steps=300, fallback_epoch=None)
    steps, values = noisy_decay(7)
    whole = WarmStart(config)
    expected = run(whole, steps, values)

    first = WarmStart(WarmStartConfig(window_steps=100, patience_steps=300, fallback_epoch=None))
    weights = run(first, steps, values, stop_at=stop_at)
    state = json.loads(json.dumps(first.state_dict()))
    second = WarmStart(WarmStartConfig(window_steps=100, patience_steps=300, fallback_epoch=None))
    second.load_state_dict(state)
    rest = [(s, v) for s, v in zip(steps, values) if s >= stop_at]
    weights += run(second, [s for s, _ in rest], [v for _, v in rest])
    assert weights == expected
    assert second.switch_record == whole.switch_record
    assert second.smoothed_mi == whole.smoothed_mi


def test_bad_configuration_and_state_are_one_line_errors():
    with pytest.raises(SrcidError, match="warm_start.mode"):
        WarmStart(WarmStartConfig(mode="sometimes"))
    with pytest.raises(SrcidError, match="window_steps"):
        WarmStart(WarmStartConfig(window_steps=0))
    with pytest.raises(SrcidError, match="epoch_layer2_weight"):
        WarmStart(WarmStartConfig(epoch_layer2_weight=0.0))
    warm = WarmStart()
    warm.observe(50, 0, 1.0)
    with pytest.raises(SrcidError, match="steps must not go back"):
        warm.observe(40, 0, 1.0)
    with pytest.raises(SrcidError, match="mode"):
        WarmStart(WarmStartConfig(mode="epoch")).load_state_dict(warm.state_dict())
    with pytest.raises(SrcidError, match="expected keys"):
        WarmStart().load_state_dict({"window": []})


def test_config_overrides_parse_the_fields():
    config = apply_overrides(WarmStartConfig(), ["mode=epoch", "fallback_epoch=none", "mi_threshold=0.1",
                                                 "patience_steps=50"])
    assert (config.mode, config.fallback_epoch, config.mi_threshold, config.patience_steps) == ("epoch", None, 0.1, 50)
    with pytest.raises(SrcidError):
        apply_overrides(WarmStartConfig(), ["mode=never"])


def test_relative_threshold_fires_below_a_fraction_of_the_curves_own_peak():
    from srcid.train.warm_start import WarmStart, WarmStartConfig

    config = WarmStartConfig(mi_threshold=0.05, mi_rel_threshold=0.3, window_steps=10, patience_steps=20,
                             mi_min_epoch=0, fallback_epoch=None)
    curve = [0.1, 0.5, 0.4, 0.3, 0.2, 0.12, 0.1, 0.09, 0.08]  # peak 0.5: bound 0.15, never below 0.05
    ws = WarmStart(config)
    for i, value in enumerate(curve):
        ws.observe(10 * (i + 1), 0, value)
        if ws.switched:
            break
    # below 0.15 from step 60 (0.12): the switch comes 20 steps later, at step 80
    assert ws.switched and ws.switch_record["step"] == 80 and "< 0.15" in ws.switch_record["reason"]
    absolute = WarmStart(WarmStartConfig(mi_threshold=0.05, mi_rel_threshold=0.0, window_steps=10, patience_steps=20, mi_min_epoch=0,
                                         fallback_epoch=None))
    for i, value in enumerate(curve):
        absolute.observe(10 * (i + 1), 0, value)
    assert not absolute.switched


def test_relative_threshold_state_resumes_and_old_states_load():
    from srcid.train.warm_start import WarmStart, WarmStartConfig

    config = WarmStartConfig(mi_rel_threshold=0.3, window_steps=10, patience_steps=20, mi_min_epoch=0, fallback_epoch=None)
    a = WarmStart(config)
    for i, value in enumerate([0.1, 0.5, 0.4]):
        a.observe(10 * (i + 1), 0, value)
    b = WarmStart(config)
    b.load_state_dict(a.state_dict())
    assert b.threshold == a.threshold == pytest.approx(0.15)
    old = {k: v for k, v in a.state_dict().items() if k != "peak"}
    old["version"] = 1
    c = WarmStart(config)
    c.load_state_dict(old)
    assert c.threshold == pytest.approx(0.05)  # no peak recorded yet: the absolute threshold
    with pytest.raises(SrcidError, match="mi_rel_threshold"):
        WarmStartConfig(mi_rel_threshold=1.5).validate()
