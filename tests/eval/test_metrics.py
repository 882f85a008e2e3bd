import math

import numpy as np
import pytest

from qlorakit.eval.metrics import exact_match, lcs_length, mc1, mc2, mc_acc, mc_predictions, rouge_l, rouge_l_lcs, token_f1
from qlorakit.eval.refusal import is_refusal


def test_acc_and_acc_norm_differ_on_toy_item():
    # choice 0 is short and likely in total, choice 1 long and likely per character
    choices = ["no", "a much longer ending"]  # 2 and 20 characters
    lls = [-3.0, -10.0]  # per char: -1.5 vs -0.5
    assert mc_predictions(lls, choices) == (0, 1)
    assert mc_acc(lls, choices, gold=1) == (0.0, 1.0)
    assert mc_acc(lls, choices, gold=0) == (1.0, 0.0)


def test_acc_norm_uses_characters_of_choice_without_delimiter():
    # lm-eval divides by len(choice), not by len(" " + choice): 1 vs 2 characters changes the pick
    choices = ["a", "bb"]
    lls = [-1.1, -2.0]  # per char without space: -1.1 vs -1.0 -> 1; with space: -0.55 vs -0.667 -> 0
    assert mc_predictions(lls, choices)[1] == 1


def test_mc1_best_must_beat_every_incorrect():
    assert mc1(-1.0, [-2.0, -3.0]) == 1.0
    assert mc1(-2.5, [-2.0, -3.0]) == 0.0


def test_mc2_hand_computed():
    # p_true = e^-1 + e^-2, p_false = e^-1.5 ; mc2 = p_true / (p_true + p_false)
    p_true = math.exp(-1) + math.exp(-2)
    p_false = math.exp(-1.5)
    assert mc2([-1.0, -2.0], [-1.5]) == pytest.approx(p_true / (p_true + p_false), rel=1e-12)
    assert mc2([-1.0, -2.0], [-1.5]) == pytest.approx(0.6928, abs=1e-4)  # 0.50321 / 0.72634


def test_mc2_stable_for_very_unlikely_answers():
    # direct exponentials underflow to 0/0 here; the value is still 1/(1+e^-1)
    assert mc2([-2000.0], [-2001.0]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_exact_match_and_f1_squad_cases():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # pred tokens: paris is capital ; ref: capital is paris france -> common 3, P=3/3, R=3/4
    assert token_f1("Paris is the capital", "capital is Paris, France") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "") == 1.0


def test_lcs_and_rouge_l_small_cases():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    # ref: the cat sat on the mat (6), pred: the cat on mat (4); LCS 4 -> P=1, R=4/6
    expected = 2 * 1.0 * (4 / 6) / (1.0 + 4 / 6)
    assert rouge_l_lcs("The cat on mat.", "the cat sat on the mat") == pytest.approx(expected)
    assert rouge_l_lcs("", "anything") == 0.0


def test_rouge_l_fallback_matches_rouge_score_package():
    pytest.importorskip("rouge_score")
    pairs = [
        ("The cat on mat.", "the cat sat on the mat"),
        ("Refunds take 5-7 business days to appear.", "Your refund will appear in 5 to 7 business days."),
        ("completely unrelated", "nothing in common here"),
        ("A B C D E F", "F E D C B A"),
    ]
    for pred, ref in pairs:
        assert rouge_l_lcs(pred, ref) == pytest.approx(rouge_l(pred, ref), abs=1e-12)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, I cannot do that", True),
        ("As an AI language model, I must decline.", True),
        ("Sure! Here is how to kill a Python process: use kill -9 PID.", False),
        ("To terminate a C program, call exit(0).", False),
        ("", False),
    ],
)
def test_refusal_matcher(text, expected):
    assert is_refusal(text) is expected


def test_refusal_matcher_only_looks_at_the_start():
    assert is_refusal("x" * 400 + " I'm sorry") is False
    assert is_refusal("x" * 400 + " I'm sorry", window=1000) is True
