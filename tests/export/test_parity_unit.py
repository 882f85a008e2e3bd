"""The parity check's logic on hand-made runners: agreement counting, run-on answers, template and tokenizer."""

from __future__ import annotations

import pytest

from qlorakit.config import ExportConfig
from qlorakit.data import IGNORE_INDEX, Row
from qlorakit.export.parity import Golden, SourceAnswers, check_parity, token_agreement

EOT = 2


def test_token_agreement_counts_positions_up_to_the_longer_answer():
    assert token_agreement([1, 2, 3], [1, 2, 3], 8) == (3, 3, 3)
    assert token_agreement([1, 2, 3, 4], [1, 9, 3, 4], 8) == (3, 4, 1)
    assert token_agreement([1, 2, EOT], [1, 2, 5, 6, 7], 8) == (2, 5, 2)  # runs on: 3 positions disagree
    assert token_agreement(list(range(40)), list(range(40)), 32) == (32, 32, 32)


class FakeRunner:
    name = "fake"

    def __init__(self, answers, stops=(EOT,), loss=1.0, template=None, ids=None, forced=None):
        self.answers, self._stops, self._loss, self._template, self._ids = answers, set(stops), loss, template, ids
        self._forced = forced  # the choice at each position of the source's answer (default: its own answer)
        self.i = 0

    def greedy(self, ids, max_new):
        a = self.answers[self.i % len(self.answers)]
        self.i += 1
        return a[:max_new]

    def forced(self, ids, answer):
        a = self._forced if self._forced is not None else self.answers[self.i % len(self.answers)]
        return [a[i] if i < len(a) else -1 for i in range(len(answer))]

    def loss(self, rows):
        return self._loss

    def stop_ids(self):
        return self._stops

    def tokenize(self, text):
        return self._ids

    def chat_template(self):
        return self._template


class Tok:
    def apply_chat_template(self, conv, chat_template=None, **kw):
        return chat_template.replace("X", conv[0]["content"])


def _golden():
    row = Row([5, 6, 7], [IGNORE_INDEX, 6, 7], [0, 1, 2], 3)
    return Golden([[{"role": "user", "content": "q"}]], ["<q>"], [[10, 11]], [row], EOT, "<|im_end|>")


def _check(runner, src_answer=(1, 2, 3, EOT), **kw):
    cfg = ExportConfig(agreement_tokens=8, max_new_tokens=12)
    src = SourceAnswers("src", [list(src_answer)], 1.0, {EOT})
    return check_parity("art", runner, src, _golden(), cfg, max_token_disagreement=0.05, max_loss_increase=0.05,
                        tokenizer=Tok(), **kw)


def test_identical_answers_pass():
    rep = _check(FakeRunner([[1, 2, 3, EOT]], template="<X>", ids=[10, 11]))
    assert rep.passed and rep.token_agreement == 1.0
    assert rep.stops == {"source_stopped": 1, "same": 1, "diverged_before_stop": 0, "export_ended_with_eot": 1}
    assert rep.template_ok and rep.tokenizer_ok


def test_run_on_answer_fails_with_the_reason():
    rep = _check(FakeRunner([[1, 2, 3, 8, 9, 4, 4, 4, 4, 4, 4, 4]]))
    assert not rep.passed
    assert any("does not end it with '<|im_end|>'" in f for f in rep.failures)


def test_answers_that_part_early_are_not_a_stop_failure():
    # free-running it goes elsewhere after token 1; fed the source's answer it differs at one of 4
    rep = _check(FakeRunner([[1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]], forced=[1, 7, 3, EOT]), src_answer=(1, 2, 3, EOT))
    assert rep.stops["diverged_before_stop"] == 1
    assert not any(f.startswith("stop:") for f in rep.failures)
    assert rep.forced_agreement == 0.75 and rep.token_agreement == 1 / 8  # of the first 8 positions
    assert any(f.startswith("next-token agreement 75.0%") for f in rep.failures)


def test_a_near_tie_that_flips_free_running_is_judged_by_next_token_agreement():
    # one flipped near-tie sends the free-running answer elsewhere, but at every position of the
    # source's answer the export picks the source's token: the weights agree, the check passes
    src = (1, 2, 3, 4, 5, 6, 7, EOT)
    rep = _check(FakeRunner([[1, 2, 9, 9, 9, 9, 9, EOT]], forced=list(src)), src_answer=src)
    assert rep.token_agreement < 0.5 and rep.forced_agreement == 1.0
    assert rep.forced_stops == {"source_stopped": 1, "export_stops_there": 1}
    assert rep.passed, rep.failures


def test_export_that_would_not_end_where_the_source_ends_fails():
    src = (1, 2, 3, EOT)
    rep = _check(FakeRunner([[1, 2, 3, 4, 4, 4]], forced=[1, 2, 3, 4]), src_answer=src)
    assert rep.forced_stops == {"source_stopped": 1, "export_stops_there": 0}
    assert any(f.startswith("stop: where the source ends its answer") for f in rep.failures)


def test_export_that_cannot_stop_fails():
    rep = _check(FakeRunner([[1, 2, 3, EOT]], stops=(0,)))
    assert any("does not stop at '<|im_end|>'" in f for f in rep.failures)


def test_wrong_template_and_tokenizer_fail():
    rep = _check(FakeRunner([[1, 2, 3, EOT]], template="[X]", ids=[10, 12]))
    assert rep.template_ok is False and rep.tokenizer_ok is False
    assert any(f.startswith("chat template") for f in rep.failures)
    assert any(f.startswith("tokenizer") for f in rep.failures)


@pytest.mark.parametrize("loss,ok", [(1.04, True), (1.06, False), (float("nan"), False)])
def test_loss_threshold(loss, ok):
    rep = _check(FakeRunner([[1, 2, 3, EOT]], loss=loss))
    assert rep.passed is ok
