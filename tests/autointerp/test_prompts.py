"""Prompts (:mod:`gsae.autointerp.prompts`): marked runs of tokens, and answers read leniently or
refused when malformed."""

from gsae.autointerp.prompts import parse_explanation, parse_labels, render


def test_render_marks_runs_of_tokens():
    tokens = ["The", " quick", " brown", " fox", "\n", "jumps"]
    assert render(tokens) == "The quick brown fox jumps"
    assert render(tokens, {1, 2, 5}) == "The<< quick brown>> fox <<jumps>>"
    assert render(tokens, {0}) == "<<The>> quick brown fox jumps"


def test_answers_are_read_leniently_and_refused_when_malformed():
    assert parse_explanation("hmm\n[EXPLANATION]: a first\n[explanation]:  colours ") == "colours"
    assert parse_explanation("no tag here") is None and parse_explanation("[EXPLANATION]: ") is None
    assert parse_labels("Sure! [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_labels("[0,1] then finally [1, 1, 0]", 3) == [1, 1, 0]
    assert parse_labels('["1", "0", true]', 3) == [1, 0, 1]
    assert parse_labels("[1, 0]", 3) is None and parse_labels("[1, 2, 0]", 3) is None
    assert parse_labels("one, zero, one", 3) is None
