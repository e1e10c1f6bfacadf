"""From a model's free text to an answer: the one choice it names, or normalised transcript text.

Models answer in sentences ("I think the speaker sounds sad."), so a choice counts when the text names it as a
whole word or phrase; naming two different choices ("happy, or maybe sad") is no answer, so hedging never
scores. When the text holds an `Answer:` mark (the chain-of-thought prompt asks for one), only what follows the
last mark counts, so choices named while reasoning don't. MMAU's and MMAR's own token-set scorer is
`coat.eval.scoring.string_match`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

ANSWER_MARK = re.compile(r"\banswer\s*:", re.IGNORECASE)
# Sentence punctuation and brackets always separate words; other symbols ("C#", "men's", "post-exercise")
# stay when a choice contains them, so "C#" and "C" remain different answers.
SEPARATORS = frozenset('.,;:!?"()[]{}')
LETTER_PREFIX = re.compile(r"^\s*\(?([A-Za-z])[).:]\s+(?=\S)")
LETTER_ANSWER = (
    re.compile(r"\(([A-Za-z])\)"),  # "(B)"
    re.compile(r"(?<![A-Za-z])([A-Z])\)"),  # "B)"
    re.compile(r"^\s*([A-Za-z])\s*[.)]?\s*$"),  # the whole answer is one letter
)


def split_answer(text: str) -> tuple[str, str]:
    """`text` cut at its last `Answer:` mark (any case): the reasoning before it and the answer after it; without a
    mark, no reasoning and all of it as the answer. Every path that reads a chain-of-thought answer cuts here.
    Raises nothing."""
    marks = list(ANSWER_MARK.finditer(text))
    return (text[:marks[-1].start()], text[marks[-1].end():]) if marks else ("", text)


def final_answer(text: str) -> str:
    """The part of `text` after its last `Answer:` mark, or all of it when there is none. Raises nothing."""
    return split_answer(text)[1]


def has_answer_mark(text: str) -> bool:
    """Whether `text` holds an `Answer:` mark (a chain of thought that reached its answer). Raises nothing."""
    return ANSWER_MARK.search(text) is not None


def normalise_text(text: str) -> str:
    """Lower case, punctuation stripped, whitespace collapsed: how transcripts are compared.

    Apostrophes are dropped ("don't" -> "dont") and other punctuation becomes a space ("well-known" ->
    "well known"), so LibriSpeech's "DON'T" and a model's "don't" agree."""
    text = unicodedata.normalize("NFKC", text).lower().replace("'", "").replace("\u2019", "")
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def _normalise_for(text: str, keep: frozenset[str]) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(
        " " if unicodedata.category(ch)[0] in "PS" and (ch in SEPARATORS or ch not in keep) else ch for ch in text
    )
    return " ".join(text.split())


def lettered(choices: Sequence[str]) -> bool:
    """Whether the choices carry their own letters in order: "(A) dog", "B. cat", "C) cow". Raises nothing."""
    letters = [LETTER_PREFIX.match(c) for c in choices]
    return all(m and m.group(1).upper() == chr(ord("A") + i) for i, m in enumerate(letters))


def _symbols(choices: Sequence[str]) -> frozenset[str]:
    return frozenset(ch for c in choices for ch in c if unicodedata.category(ch)[0] in "PS")


def parse_answer(task: str, text: str, choices: Sequence[str] | None) -> str:
    """The answer `text` gives: the one choice it names (as spelled in `choices`), or "" when it names none or
    several; without choices (transcription, open questions) the normalised text.

    A choice is named when the whole answer equals it (normalised) or mentions it as a whole word or phrase; a
    mention inside a longer mention of another choice ("noise" in "noise burst") does not count. Only when no
    choice is mentioned, and the choices are lettered, a letter such as "(B)" or "B)" names one. Identical
    choices count as one. `task` is accepted for symmetry with `is_correct`; the rule depends only on whether
    there are choices. Raises nothing.
    """
    answer = final_answer(text)
    if not choices:
        return normalise_text(answer)
    keep = _symbols(choices)
    has_letters = lettered(choices)
    candidates = []  # (normalised form, index of its choice)
    for i, choice in enumerate(choices):
        forms = [choice, LETTER_PREFIX.sub("", choice)] if has_letters else [choice]
        candidates += [(_normalise_for(form, keep), i) for form in forms if _normalise_for(form, keep)]
    said = _normalise_for(answer, keep)
    named = {i for form, i in candidates if said == form}
    if not named:
        mentions = [(found.start(), found.start() + len(form), i) for form, i in candidates
                    for found in re.finditer(rf"(?<!\S)(?={re.escape(form)}(?!\S))", said)]
        named = {i for start, end, i in mentions
                 if not any(j != i and s <= start and end <= e and e - s > end - start for s, e, j in mentions)}
    if not named and has_letters:
        letters = (ord(found.group(1).upper()) - ord("A") for pattern in LETTER_ANSWER
                   for found in pattern.finditer(answer))
        named = {index for index in letters if 0 <= index < len(choices)}
    first = min(named, default=None)
    distinct = {_normalise_for(choices[i], keep) for i in named}
    return choices[first] if len(distinct) == 1 else ""


def is_correct(task: str, prediction: str, answer: str, choices: Sequence[str] | None = None) -> bool:
    """Whether a parsed `prediction` (from `parse_answer`) is the reference `answer`.

    With choices: the same choice (compared normalised; "" never counts). Without: the normalised texts are
    equal and not empty (exact match; transcription quality is measured by WER in `coat.eval.metrics`).
    Raises nothing.
    """
    if not prediction:
        return False
    if choices:
        keep = _symbols(choices)
        return _normalise_for(prediction, keep) == _normalise_for(answer, keep)
    return normalise_text(prediction) == normalise_text(answer) != ""
