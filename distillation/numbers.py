"""The numbers a sentence states, normalised so that paraphrases agree.

A paraphrase must not change a quantity ("3 people" vs "5 people"), so the
filter compares the *set* of values each sentence mentions. Choices, so that
surface variation does not reject true paraphrases:

- digits and words are the same value: "two" == "2", "twenty-five" == "25",
  "3 million" == "3,000,000" == "three million", "one hundred and five" == "105";
- thousands separators are dropped ("1,000" == "1000"); decimals compare by
  value ("3.50" == "3.5"); "%", "$" and digit ordinals ("2nd" -> 2) keep the value;
- a lone 1 ("one", "1", "1st") is ignored: "one" is as often a pronoun or an
  article ("no one", "one of the best" vs "a top player") as a count, so
  treating it as a number would reject many real paraphrases;
- word ordinals ("second", "third") are not numbers ("second" is also a unit
  of time), so "2nd" vs "second" counts as a mismatch;
- repeats do not matter (a set, not a multiset), and neither does order.
"""

from __future__ import annotations

import re

UNITS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "one": 1,
}  # fmt: skip
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000,
          "trillion": 1_000_000_000_000}  # fmt: skip
WORD_VALUES = {**UNITS, **TENS}

# A digit run with optional thousands groups, decimals and ordinal suffix, or a word.
_TOKEN = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:st|nd|rd|th)?|\.\d+|[a-z]+")


def _is_digit(tok: str) -> bool:
    return tok[0].isdigit() or tok[0] == "."


def _digit_value(tok: str) -> float:
    return float(re.sub(r"(st|nd|rd|th)$", "", tok).replace(",", ""))


def _span_value(span: list[str]) -> float:
    """Classic words-to-number: units and tens add, 'hundred' multiplies the
    current group, larger scales close it ("two thousand three hundred" -> 2300)."""
    total, current = 0.0, 0.0
    for w in span:
        if w == "and":
            continue
        if _is_digit(w):
            current += _digit_value(w)
        elif w in WORD_VALUES:
            current += WORD_VALUES[w]
        elif w == "hundred":
            current = (current or 1) * 100
        else:
            total += (current or 1) * SCALES[w]
            current = 0.0
    return total + current


def extract_numbers(text: str) -> frozenset[float]:
    """The set of numeric values ``text`` states (see the module docstring)."""
    toks = _TOKEN.findall(text.lower().replace("-", " "))
    spans: list[list[str]] = []
    span: list[str] = []
    for i, tok in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        if _is_digit(tok):
            if span:  # "5 6" are two numbers; a digit never continues a span
                spans.append(span)
            span = [tok]
        elif tok in SCALES and span:
            span.append(tok)
        elif tok in WORD_VALUES or tok in SCALES:
            if span and (_is_digit(span[-1]) or not _continues(span[-1], tok)):
                spans.append(span)
                span = []
            span.append(tok)
        elif tok == "and" and span and not _is_digit(span[-1]) and (nxt in WORD_VALUES) and span[-1] in SCALES:
            span.append(tok)  # "one hundred and five"
        else:
            if span:
                spans.append(span)
            span = []
    if span:
        spans.append(span)
    values = set()
    for s in spans:
        v = _span_value(s)
        if v == 1 and not any(w in SCALES for w in s):
            continue  # a lone "one"/"1": see the module docstring
        values.add(v)
    return frozenset(values)


def _continues(prev: str, tok: str) -> bool:
    """Whether number word ``tok`` extends the number ending in word ``prev``:
    "twenty five", "hundred five", "thousand twenty" do; "five six" does not."""
    if prev in SCALES or prev == "and":
        return True
    return prev in TENS and tok in UNITS and UNITS[tok] < 10


def numbers_match(a: str, b: str) -> bool:
    """True when both sentences state exactly the same set of numbers."""
    return extract_numbers(a) == extract_numbers(b)
