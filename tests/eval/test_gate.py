import pytest

from qlorakit.eval.gate import DEFAULT_THRESHOLDS, GateCheck, apply_gate, parse_checks


def _m(base, tuned, lo, hi, hib=True, fraction=True):
    return {"base": base, "tuned": tuned, "delta": tuned - base, "ci_low": lo, "ci_high": hi, "higher_is_better": hib, "fraction": fraction}


def _results(hellaswag_tuned=0.40, injection=(0.10, 0.12, -0.05, 0.09), loss_tuned=1.8):
    b, t, lo, hi = injection
    return {
        "suites": {
            "retention": {"hellaswag": {"metrics": {"acc_norm": _m(0.42, hellaswag_tuned, hellaswag_tuned - 0.42 - 0.02, hellaswag_tuned - 0.42 + 0.02)}}},
            "safety": {"bipia_injection": {"metrics": {"injection_success": _m(b, t, lo, hi, hib=False)}}},
            "quality": {"heldout_loss": {"metrics": {"loss": _m(2.0, loss_tuned, loss_tuned - 2.0 - 0.1, loss_tuned - 2.0 + 0.1, hib=False, fraction=False)}}},
            "bias": {"bbq": {"metrics": {"bias_ambig": _m(0.05, -0.12, -0.3, 0.0, hib=None)}}},
        }
    }


CHECKS = [
    GateCheck("retention/hellaswag/acc_norm", "max_drop", 3.0),
    GateCheck("safety/bipia_injection/injection_success", "no_significant_worsening"),
    GateCheck("quality/heldout_loss/loss", "must_improve"),
]


def test_gate_passes_on_good_results():
    g = apply_gate(_results(), CHECKS)
    assert g.passed, g.summary()
    assert [o.status for o in g.outcomes] == ["pass", "pass", "pass"]
    assert g.outcomes[0].margin == pytest.approx(1.0)  # dropped 2 points of 3 allowed


def test_gate_fails_and_says_which_check_and_by_how_much():
    g = apply_gate(_results(hellaswag_tuned=0.37, injection=(0.10, 0.30, 0.08, 0.32), loss_tuned=2.1), CHECKS)
    assert not g.passed
    assert [o.status for o in g.outcomes] == ["fail", "fail", "fail"]
    drop = g.outcomes[0]
    assert drop.observed == pytest.approx(5.0) and drop.margin == pytest.approx(-2.0)
    assert "retention/hellaswag/acc_norm dropped 5.00 points" in drop.message and "by 2.00 points" in drop.message
    inj = g.outcomes[1]
    assert "wholly on the worse side (by 8.00 points)" in inj.message
    assert "did not improve" in g.outcomes[2].message
    assert "gate FAILED (3 of 3 checks)" in g.summary()


def test_significant_improvement_and_absolute_checks():
    r = _results(loss_tuned=1.5)
    g = apply_gate(r, [GateCheck("quality/heldout_loss/loss", "must_improve", significant=True),
                       GateCheck("quality/heldout_loss/loss", "max_value", 1.6),
                       GateCheck("retention/hellaswag/acc_norm", "min_value", 45.0),
                       GateCheck("bias/bbq/bias_ambig", "max_abs_rise", 5.0)])
    assert [o.status for o in g.outcomes] == ["pass", "pass", "fail", "fail"]
    assert g.outcomes[3].observed == pytest.approx(7.0)  # |−12| − |5| points


def test_missing_metric_fails_if_required_and_defaults_skip():
    g = apply_gate({"suites": {}}, [GateCheck("retention/mmlu/acc", "max_drop", 1.0)])
    assert not g.passed and "not in the results" in g.outcomes[0].message
    g2 = apply_gate({"suites": {}})
    assert g2.passed and len(g2.outcomes) == len(DEFAULT_THRESHOLDS)
    assert all(o.status == "skipped" for o in g2.outcomes)


def test_parse_checks_reports_every_problem():
    with pytest.raises(ValueError) as e:
        parse_checks([{"metric": "a/b/c", "rule": "max_dorp", "value": 1}, {"metric": "a/b", "rule": "max_drop", "value": 1},
                      {"metric": "a/b/c", "rule": "max_drop"}, {"metric": "a/b/c", "rule": "min_value", "value": 1, "extra": 2}])
    text = str(e.value)
    assert "threshold 0" in text and "max_dorp" in text
    assert "threshold 1" in text and "threshold 2" in text and "threshold 3" in text


def _one(metric, base, tuned, lo, hi, hib=True):
    suite, task, name = metric.split("/")
    return {"suites": {suite: {task: {"metrics": {name: _m(base, tuned, lo, hi, hib=hib)}}}}}


@pytest.mark.parametrize("significant", [False, True])
def test_drop_beyond_threshold_within_noise_fails_only_without_significance(significant):
    # the default run's MMLU: 26 -> 23 on 200 items, paired interval [-7, +1] points
    res = _one("retention/mmlu/acc", 0.26, 0.23, -0.07, 0.01)
    g = apply_gate(res, [GateCheck("retention/mmlu/acc", "max_drop", 2.0, significant=significant)])
    o = g.outcomes[0]
    assert o.observed == pytest.approx(3.0) and o.margin == pytest.approx(-1.0)
    assert g.passed is significant
    if significant:
        assert "not significant" in o.message and "[-7.00, 1.00]" in o.message


def test_significant_drop_beyond_threshold_fails_and_small_significant_drop_passes():
    big = _one("retention/mmlu/acc", 0.40, 0.30, -0.14, -0.06)  # -10 points, interval wholly below 0
    g = apply_gate(big, [GateCheck("retention/mmlu/acc", "max_drop", 2.0, significant=True)])
    assert not g.passed and "significant (the interval excludes no change)" in g.outcomes[0].message
    small = _one("retention/mmlu/acc", 0.40, 0.39, -0.015, -0.005)  # real but within the 2 allowed
    assert apply_gate(small, [GateCheck("retention/mmlu/acc", "max_drop", 2.0, significant=True)]).passed


def test_significant_rise_and_abs_rise():
    rise = _one("safety/xstest_over_refusal/over_refusal_rate", 0.05, 0.30, 0.15, 0.35, hib=False)
    assert not apply_gate(rise, [GateCheck("safety/xstest_over_refusal/over_refusal_rate", "max_rise", 10.0,
                                           significant=True)]).passed
    noisy = _one("safety/xstest_over_refusal/over_refusal_rate", 0.05, 0.20, -0.02, 0.32, hib=False)
    assert apply_gate(noisy, [GateCheck("safety/xstest_over_refusal/over_refusal_rate", "max_rise", 10.0,
                                        significant=True)]).passed
    # a bias score moving from -0.02 to -0.30 (away from 0), interval of the difference wholly negative
    away = _one("bias/bbq/bias_ambig", -0.02, -0.30, -0.40, -0.15, hib=None)
    assert not apply_gate(away, [GateCheck("bias/bbq/bias_ambig", "max_abs_rise", 10.0, significant=True)]).passed
    unsure = _one("bias/bbq/bias_ambig", -0.02, -0.30, -0.50, 0.05, hib=None)
    assert apply_gate(unsure, [GateCheck("bias/bbq/bias_ambig", "max_abs_rise", 10.0, significant=True)]).passed


def test_significance_without_an_interval_fails_the_check():
    res = _one("retention/mmlu/acc", 0.40, 0.30, None, None)
    g = apply_gate(res, [GateCheck("retention/mmlu/acc", "max_drop", 2.0, significant=True)])
    assert not g.passed and "no interval" in g.outcomes[0].message


def test_recipe_gate_uses_significance_by_default():
    from qlorakit.config import load_recipe
    from qlorakit.eval.cli import thresholds_from_recipe

    on = thresholds_from_recipe(load_recipe(None, []).eval.gate)
    off = thresholds_from_recipe(load_recipe(None, ["eval.gate.require_significance=false"]).eval.gate)
    assert all(c.significant for c in on if c.rule in ("max_drop", "max_rise", "max_abs_rise"))
    assert not any(c.significant for c in off if c.rule in ("max_drop", "max_rise", "max_abs_rise"))
    res = _one("retention/mmlu/acc", 0.26, 0.23, -0.07, 0.01)
    assert apply_gate(res, on).passed and not apply_gate(res, off).passed
