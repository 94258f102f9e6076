"""Every prompt gsae-autointerp sends, and how each answer is read. One module, so that what an
explainer or scorer model is asked can be read (and changed) in one place.

The pipeline is Paulo et al.'s ("Automatically interpreting millions of features in large
language models", 2024), as the Group-SAE paper uses it (Section 4, Appendix D):

1. **Explanation.** The explainer sees a latent's top-activating windows (32 tokens each) with
   the tokens where the latent fires marked ``<<like this>>`` and its strongest activation at
   each (0-9 scale), and answers with one short explanation on a line starting
   ``[EXPLANATION]:`` (:func:`explanation_messages`, :func:`parse_explanation`).
2. **Detection.** The scorer gets the explanation and numbered windows, half where the latent
   fired (a random sample of them, not the ones the explainer saw) and half where it did not,
   shuffled, and answers one list of 0/1, one per window: does the latent fire on it
   (:func:`detection_messages`).
3. **Fuzzing.** The scorer gets the explanation and numbered windows with some tokens marked:
   in windows where the latent fired the marks are on the tokens it fired on; in the others the
   same number of tokens is marked at random. It answers 0/1 per window: are the marked tokens
   the ones the explanation describes (:func:`fuzzing_messages`).

Both scores are the accuracy of the scorer's list against the truth (:func:`parse_labels`
reads it). Prompts ask for plain text answers, so any chat model behind an OpenAI-compatible
endpoint can play either role; temperature 0 is used for all.
"""

from __future__ import annotations

import re

MARK_OPEN, MARK_CLOSE = "<<", ">>"

EXPLAINER_SYSTEM = """You are an interpretability researcher studying one latent direction of \
a language model's activations. You will see short text excerpts. In each, the tokens on which \
the latent is active are marked <<like this>>, and after each excerpt the strongest activations \
are listed as (token, strength) with strength from 1 (weak) to 9 (strongest seen).

Find what the marked tokens have in common: a word or word class, a topic, a syntactic role, \
a formatting pattern, or what comes just before them. Think about it briefly if you like, then \
give one concise explanation (at most 15 words) of what makes the latent fire, on the last \
line, in the form:
[EXPLANATION]: <your explanation>"""

DETECTION_SYSTEM = """You evaluate an explanation of a latent direction of a language model. \
You will be given the explanation and numbered text excerpts. The latent is active somewhere \
in some excerpts and nowhere in the others. For each excerpt decide whether, according to the \
explanation, the latent is active in it (1) or not (0).

Answer with one list of 0s and 1s, one entry per excerpt, in order, and nothing else, e.g. \
[1, 0, 0, 1]"""

FUZZING_SYSTEM = """You evaluate an explanation of a latent direction of a language model. \
You will be given the explanation and numbered text excerpts in which some tokens are marked \
<<like this>>. In some excerpts the marked tokens are exactly where the latent is active; in \
the others the marks were placed at random. For each excerpt decide whether, according to the \
explanation, the marked tokens are the ones where the latent is active (1) or not (0).

Answer with one list of 0s and 1s, one entry per excerpt, in order, and nothing else, e.g. \
[0, 1, 1, 0]"""


def render(tokens: list[str], marked: set[int] | frozenset[int] = frozenset()) -> str:
    """An excerpt as one line: tokens joined, the ``marked`` positions wrapped in ``<<>>``
    (adjacent marked tokens share one pair of marks), newlines shown as spaces."""
    out, inside = [], False
    for j, tok in enumerate(tokens):
        on = j in marked
        if on and not inside:
            out.append(MARK_OPEN)
        elif inside and not on:
            out.append(MARK_CLOSE)
        inside = on
        out.append(tok)
    if inside:
        out.append(MARK_CLOSE)
    return "".join(out).replace("\n", " ").strip()


def strengths(tokens: list[str], acts: list[float], scale: float) -> str:
    """``(token, strength)`` of the active tokens, strength 1-9 relative to ``scale`` (the
    latent's largest activation among the examples shown)."""
    pairs = [
        (t.strip() or repr(t), max(1, min(9, round(9 * a / scale))))
        for t, a in zip(tokens, acts, strict=True)
        if a > 0
    ]
    return ", ".join(f"({t}, {s})" for t, s in pairs)


def explanation_messages(examples: list[tuple[list[str], list[float]]]) -> list[dict]:
    """Chat messages asking for an explanation of a latent from its top windows: ``(tokens,
    activations)`` per window (activation 0 where the latent is off)."""
    scale = max((max(acts) for _, acts in examples), default=1.0) or 1.0
    lines = []
    for n, (tokens, acts) in enumerate(examples, 1):
        marked = {j for j, a in enumerate(acts) if a > 0}
        lines.append(f"Excerpt {n}: {render(tokens, marked)}")
        lines.append(f"Activations: {strengths(tokens, acts, scale)}")
    return [
        {"role": "system", "content": EXPLAINER_SYSTEM},
        {"role": "user", "content": "\n".join(lines)},
    ]


def detection_messages(explanation: str, excerpts: list[list[str]]) -> list[dict]:
    """Chat messages for detection: the explanation and the numbered, unmarked excerpts."""
    body = "\n".join(f"Excerpt {n}: {render(tokens)}" for n, tokens in enumerate(excerpts, 1))
    return [
        {"role": "system", "content": DETECTION_SYSTEM},
        {"role": "user", "content": f"Explanation: {explanation}\n\n{body}"},
    ]


def fuzzing_messages(explanation: str, excerpts: list[tuple[list[str], set[int]]]) -> list[dict]:
    """Chat messages for fuzzing: the explanation and numbered excerpts with marked tokens."""
    body = "\n".join(
        f"Excerpt {n}: {render(tokens, marked)}" for n, (tokens, marked) in enumerate(excerpts, 1)
    )
    return [
        {"role": "system", "content": FUZZING_SYSTEM},
        {"role": "user", "content": f"Explanation: {explanation}\n\n{body}"},
    ]


def parse_explanation(answer: str) -> str | None:
    """The text after the last ``[EXPLANATION]:``, or None if there is none (or it is empty)."""
    found = re.findall(r"\[EXPLANATION\]\s*:\s*(.+)", answer, flags=re.IGNORECASE)
    if not found:
        return None
    text = found[-1].strip().strip('"').strip()
    return text or None


def parse_labels(answer: str, n: int) -> list[int] | None:
    """The last bracketed list of exactly ``n`` 0/1 entries in ``answer`` (``[1, 0, 1]``;
    ``true``/``false`` are read as 1/0), or None when there is none."""
    for body in reversed(re.findall(r"\[([^\[\]]*)\]", answer)):
        items = [x.strip().strip("'\"").lower() for x in body.split(",") if x.strip()]
        mapping = {"1": 1, "0": 0, "true": 1, "false": 0}
        if len(items) == n and all(x in mapping for x in items):
            return [mapping[x] for x in items]
    return None
