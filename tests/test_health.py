"""The divergence checks' verdicts (pretrain/training/health.py), on sequences of step losses and overflow flags.
The runs that inject the faults into real training are in test_divergence.py."""
import json
import math
import os
import random

import pytest
from omegaconf import OmegaConf

from pretrain.errors import UserError
from pretrain.training.health import DataSkips, HealthMonitor, HealthSettings, health_settings, injected_loss_factor

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
CONF = OmegaConf.load(os.path.join(CONF_DIR, "config.yaml")).train


def monitor(precision="fp32", min_loss_scale=None, **kw) -> HealthMonitor:
    return HealthMonitor(HealthSettings(**kw), precision, min_loss_scale)


def falling_noisy_losses(n: int, seed: int = 0) -> list[float]:
    """A pre-training curve: fast fall from 10 towards 3, with 5% multiplicative noise per step."""
    rng = random.Random(seed)
    return [(3 + 7 * math.exp(-k / 150)) * (1 + 0.05 * rng.gauss(0, 1)) for k in range(n)]


def test_the_config_defaults_are_the_documented_ones():
    s = health_settings(CONF)
    assert s == HealthSettings()  # conf/config.yaml and the dataclass say the same
    assert s.on_divergence == "stop" and s.min_history == 20
    assert health_settings(OmegaConf.load(os.path.join(CONF_DIR, "finetune.yaml")).train).spike_sigmas is None


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_a_non_finite_loss_is_an_event_at_its_step(kind):
    m = monitor()
    for step, loss in enumerate(falling_noisy_losses(30), start=1):
        assert m.observe(step, loss, overflow=False, loss_scale=None) is None
    event = m.observe(31, float(kind), overflow=True, loss_scale=None)
    assert (event.step, event.kind, event.action) == (31, "nonfinite_loss", "stop")
    assert event.row()["loss"] is None and json.dumps(event.row())  # a strict-JSON row


def test_a_non_finite_gradient_with_a_finite_loss_is_an_event():
    event = monitor(on_divergence="rollback").observe(3, 5.0, overflow=True, loss_scale=None)
    assert (event.kind, event.action) == ("nonfinite_grad", "rollback")


def test_no_spike_on_a_long_noisy_falling_curve():
    m = monitor()
    assert all(m.observe(s, loss, False, None) is None for s, loss in enumerate(falling_noisy_losses(5000), start=1))


def test_a_spike_is_seen_once_the_window_is_long_enough():
    m = monitor()
    losses = falling_noisy_losses(60)
    for step, loss in enumerate(losses[:19], start=1):  # 19 < min_history: not judged yet
        assert m.observe(step, loss, False, None) is None
    assert m.observe(20, 100.0, False, None) is None  # too early to call: it joins the window
    m = monitor()
    for step, loss in enumerate(losses, start=1):
        assert m.observe(step, loss, False, None) is None
    median = sorted(losses[-60:])[30]
    event = m.observe(61, 2 * median, False, None)
    assert event is not None and event.kind == "spike" and event.step == 61
    assert m.observe(62, losses[-1], False, None) is None  # the spike did not enter the window


def test_a_rise_below_the_relative_floor_is_no_spike():
    """A flat window (MAD about 0) makes any rise many sigmas: spike_rise keeps noise from being called."""
    m = monitor(spike_rise=0.5)
    for step in range(1, 41):
        m.observe(step, 4.0 + 1e-6 * (step % 2), False, None)
    assert m.observe(41, 5.9, False, None) is None
    assert m.observe(42, 6.1, False, None).kind == "spike"


def test_spike_check_off_and_the_whole_check_off():
    m = monitor(spike_sigmas=None)
    for step in range(1, 41):
        m.observe(step, 4.0, False, None)
    assert m.observe(41, 400.0, False, None) is None and m.observe(42, math.nan, True, None).kind == "nonfinite_loss"
    off = monitor(on_divergence="off")
    assert off.observe(1, math.nan, True, None) is None


def test_fp16_overflow_is_normal_until_it_persists():
    m = monitor("fp16", min_loss_scale=1.0, max_skipped_steps=4)
    assert m.observe(1, math.nan, overflow=True, loss_scale=2.0**16) is None  # loss scaling's own business
    assert m.observe(2, 9.0, overflow=False, loss_scale=2.0**15) is None
    for step in range(3, 6):
        assert m.observe(step, math.inf, overflow=True, loss_scale=2.0**14) is None
    event = m.observe(6, math.inf, overflow=True, loss_scale=2.0**13)
    assert (event.kind, event.action) == ("loss_scale", "stop") and "4 optimizer steps in a row" in event.what


def test_fp16_loss_scale_at_its_floor_stops_even_in_rollback_mode():
    m = monitor("fp16", min_loss_scale=1.0, on_divergence="rollback")
    event = m.observe(7, math.inf, overflow=True, loss_scale=1.0)
    assert (event.kind, event.action) == ("loss_scale", "stop") and "floor" in event.what


def test_a_resumed_monitor_judges_as_the_straight_one():
    losses = falling_noisy_losses(80)
    straight, verdicts = monitor(), []
    for step, loss in enumerate(losses, start=1):
        straight.observe(step, loss, False, None)
        if step == 40:
            resumed = HealthMonitor(HealthSettings(), "fp32", None, json.loads(json.dumps({"health": straight.state()}))["health"])
    for step in range(41, 81):
        verdicts.append(resumed.observe(step, losses[step - 1], False, None))
    assert list(resumed.window.losses) == list(straight.window.losses) and verdicts == [None] * 40
    assert resumed.observe(81, 3 * losses[-1], False, None).kind == straight.observe(81, 3 * losses[-1], False, None).kind


def test_data_skips_shift_the_data_of_later_steps(tmp_path):
    skips = DataSkips(str(tmp_path))
    event = monitor(on_divergence="rollback").observe(8, math.nan, True, None)
    skips.add(6, 2, event, rank=0)
    skips.add(6, 3, event, rank=0)  # a second rollback to the same checkpoint
    assert [skips.offset(s) for s in (5, 6, 7)] == [0, 5, 5]
    assert DataSkips(str(tmp_path)).records == skips.records  # written, read back by every rank
    (tmp_path / "skipped_data.json").write_text('{"after_step": 1}')
    with pytest.raises(UserError, match="skipped_data.json: not the skipped-data record"):
        DataSkips(str(tmp_path))


@pytest.mark.parametrize("key, value, message", [
    ("on_divergence", "panic", "train.on_divergence=panic: must be stop, rollback, warn or off"),
    ("max_rollbacks", -1, "train.max_rollbacks=-1: must be an integer >= 0"),
    ("spike_window", 4, "train.spike_window=4: must be an integer >= 8"),
    ("spike_sigmas", 0, "train.spike_sigmas=0: must be a number > 0 or null (no spike check)"),
    ("spike_rise", "x", "train.spike_rise=x: must be a number > 0"),
    ("max_skipped_steps", True, "train.max_skipped_steps=True: must be an integer >= 1"),
])  # fmt: skip
def test_bad_settings_are_one_line(key, value, message):
    t = OmegaConf.merge(CONF, {key: value})
    with pytest.raises(UserError) as e:
        health_settings(t)
    assert str(e.value) == message


def test_the_injected_fault_names_a_data_step(monkeypatch):
    monkeypatch.setenv("PRETRAIN_INJECT_LOSS", "7:nan,9:50")
    assert math.isnan(injected_loss_factor(7)) and injected_loss_factor(9) == 50 and injected_loss_factor(8) == 1
