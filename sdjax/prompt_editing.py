"""A1111's prompt editing and alternation: which text a prompt asks for at each sampling step.

Syntax (AUTOMATIC1111's web UI, whose grammar and results this module reproduces):
  [from:to:when]   "from" until step `when`, then "to"
  [to:when]        nothing until step `when`, then "to"
  [from::when]     "from" until step `when`, then nothing
  [a|b|c]          a, b, c, a, ... one per step in turn (an empty option is nothing)
`when` is a step number, or a fraction of the steps when written with a decimal point (0.25, .5, 1.0).
They nest in each other and in emphasis: "(a [b:c:0.5]:1.2)", "[[red|blue] ball:cube:10]". Anything else
is text, kept as written for the emphasis parser (`sdjax.prompts.parse_prompt_attention`): "(...)",
"[...]", "(...:1.2)", BREAK, escapes such as "\\[". Brackets that do not form one of these at the top
level are text too ("a [b" stays "a [b"); a prompt with a "|" outside any "[...]" alternation, or ending
in a lone backslash, is one text for every step, as A1111 treats a prompt it cannot parse.

`prompt_schedule(prompt, steps)` gives A1111's schedule, the output of its
`get_learned_conditioning_prompt_schedules([prompt], steps)[0]`: a list of [end_step, text] pairs; at
sampling step k (0-based, counting the sampler's steps) the text of the first pair with k <= end_step
applies (`step_texts`).
"""

from __future__ import annotations

import dataclasses
import math
import re

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)  # text up to the next special character
# lark's SIGNED_NUMBER: optional sign, then an int, a decimal or either with an exponent
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+))\s*\]")
_STRAY = "[]():"  # characters that may stand alone outside any construct


@dataclasses.dataclass(frozen=True)
class _Edit:
    """[before:after:when]; `before` None when absent ([after:when])."""

    before: tuple | None
    after: tuple
    when: str  # the number as written


@dataclasses.dataclass(frozen=True)
class _Alternation:
    options: tuple[tuple, ...]


class _NoParse(Exception):
    """The prompt has no parse: A1111 then uses it unchanged for every step."""


def _prompt(s: str, i: int) -> tuple[list, int]:
    """The longest run of text, emphasis, edits and alternations from s[i]: (parts, end)."""
    parts: list = []
    while i < len(s):
        c = s[i]
        if c in "([":
            construct = _paren(s, i) if c == "(" else _bracket(s, i)
            if construct is None:
                break
            found, i = construct
            parts.extend(found)
            continue
        m = _PLAIN.match(s, i)
        if m is None:  # a special character, or a backslash at the very end
            break
        parts.append(m.group())
        i = m.end()
    return parts, i


def _paren(s: str, i: int) -> tuple[list, int] | None:
    """Emphasis "(" prompt ")" or "(" prompt ":" prompt ")" at s[i] == "(", kept as text with its parts."""
    inner, j = _prompt(s, i + 1)
    if j < len(s) and s[j] == ")":
        return ["(", *inner, ")"], j + 1
    if j < len(s) and s[j] == ":":
        weight, k = _prompt(s, j + 1)
        if k < len(s) and s[k] == ")":
            return ["(", *inner, ":", *weight, ")"], k + 1
    return None


def _bracket(s: str, i: int) -> tuple[list, int] | None:
    """At s[i] == "[": emphasis "[" prompt "]" (kept as text), an edit or an alternation."""
    first, j = _prompt(s, i + 1)
    if j >= len(s):
        return None
    if s[j] == "]":
        return ["[", *first, "]"], j + 1
    if s[j] == "|":
        options = [tuple(first)]
        while j < len(s) and s[j] == "|":
            option, j = _prompt(s, j + 1)
            options.append(tuple(option))
        if j < len(s) and s[j] == "]":
            return [_Alternation(tuple(options))], j + 1
        return None
    if s[j] != ":":
        return None
    m = _NUMBER.match(s, j + 1)
    if m is not None:  # [after:when]
        return [_Edit(None, tuple(first), m.group(1))], m.end()
    second, k = _prompt(s, j + 1)
    if k < len(s) and s[k] == ":":
        m = _NUMBER.match(s, k + 1)
        if m is not None:  # [before:after:when]
            return [_Edit(tuple(first), tuple(second), m.group(1))], m.end()
    return None


def _parse(prompt: str) -> list:
    """The parts of a whole prompt: constructs where they parse, stray brackets and colons as text."""
    parts, i = _prompt(prompt, 0)
    while i < len(prompt):
        if prompt[i] not in _STRAY:
            raise _NoParse
        parts.append(prompt[i])
        more, i = _prompt(prompt, i + 1)
        parts.extend(more)
    return parts


def _when(number: str, steps: int) -> int:
    """The last step of an edit's first text: a decimal is a fraction of the steps, else a step number;
    truncated towards 0 and at most `steps`."""
    value = float(number)
    if "." in number:
        value *= steps
    if not math.isfinite(value):
        return steps if value > 0 else -1
    return min(steps, int(value))


def _walk(parts, found: list) -> None:
    for part in parts:
        if isinstance(part, _Edit):
            found.append(part)
            _walk(part.before or (), found)
            _walk(part.after, found)
        elif isinstance(part, _Alternation):
            found.append(part)
            for option in part.options:
                _walk(option, found)


def _text_at(parts, step: int, steps: int) -> str:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, _Edit):
            chosen = (part.before or ()) if step <= _when(part.when, steps) else part.after
            out.append(_text_at(chosen, step, steps))
        else:
            out.append(_text_at(part.options[(step - 1) % len(part.options)], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[list]:
    """A1111's schedule of `prompt` over `steps` sampling steps: [[end_step, text], ...], end steps rising,
    the last `steps`. Edits end a text at their step (those at step 0 or below end none); alternations end
    one at every step.

    >>> prompt_schedule("a [b:3]", 10)
    [[3, 'a '], [10, 'a b']]
    >>> prompt_schedule("a [b : c : 1] d", 10)
    [[1, 'a b  d'], [10, 'a  c  d']]
    >>> prompt_schedule("a[b:[c:d:2]:1]e", 10)
    [[1, 'abe'], [2, 'ace'], [10, 'ade']]
    >>> prompt_schedule("a [b:.5] c", 10)
    [[5, 'a  c'], [10, 'a b c']]
    >>> prompt_schedule("[fe|]male", 4)
    [[1, 'female'], [2, 'male'], [3, 'female'], [4, 'male']]
    >>> prompt_schedule("a [unbalanced", 10)
    [[10, 'a [unbalanced']]
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    try:
        parts = _parse(prompt)
    except _NoParse:
        return [[steps, prompt]]
    constructs: list = []
    _walk(parts, constructs)
    ends = {steps}
    for construct in constructs:
        if isinstance(construct, _Alternation):
            ends.update(range(1, steps + 1))
        elif (when := _when(construct.when, steps)) >= 1:
            ends.add(when)
    return [[end, _text_at(parts, end, steps)] for end in sorted(ends)]


def step_texts(schedule: list[list], steps: int) -> list[int]:
    """For each sampling step k in [0, steps): the index in `schedule` of its text, the first pair with
    k <= end_step (A1111's `reconstruct_cond_batch`); the last pair past the schedule's end."""
    ends = [end for end, _ in schedule]
    out = []
    for k in range(steps):
        out.append(next((i for i, end in enumerate(ends) if k <= end), len(ends) - 1))
    return out


def text_table(sources: list[tuple[str, ...]], steps: int, max_steps: int) -> tuple[list[list[tuple]], list[list[int]]]:
    """The distinct texts of each conditioning source and which one each step uses.

    A source is a tuple of prompts read together (one per text encoder: SDXL's prompt and prompt_2); each
    is scheduled with `prompt_schedule` over `steps`. Returns, per source, its distinct text tuples in
    order of first use, and for each step k in [0, max_steps) the index of the tuple step k uses (steps
    past `steps` keep the last).
    """
    texts, index = [], []
    for source in sources:
        per_prompt = []
        for prompt in source:
            schedule = prompt_schedule(prompt, steps)
            chosen = step_texts(schedule, steps)
            per_prompt.append([schedule[chosen[min(k, steps - 1)]][1] for k in range(max_steps)])
        distinct: list[tuple] = []
        rows = []
        for k in range(max_steps):
            at_k = tuple(p[k] for p in per_prompt)
            if at_k not in distinct:
                distinct.append(at_k)
            rows.append(distinct.index(at_k))
        texts.append(distinct)
        index.append(rows)
    return texts, index


def stack_size(count: int) -> int:
    """The static number of texts a program holds per source for `count` distinct ones: 1, or the next
    power of two (a request with more edits compiles again only when it crosses one)."""
    return 1 if count <= 1 else 1 << (count - 1).bit_length()
