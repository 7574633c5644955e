"""The embedded default task, "atlas": facts about fictional countries.

Knowledge injection, as in the reference benchmark: the base model cannot know these
facts, so the eval loss falls only as far as the adapter can store them, and module set
and rank visibly matter. Generated deterministically (same rows on every machine, no
download): each fact has three phrasings of its question; two are for training, the
third, never trained on, is for evaluation.
"""

from __future__ import annotations

import random

SYSTEM = "Answer in one sentence."
COUNTRIES = 60
_ONSETS = ["v", "k", "m", "t", "z", "br", "dr", "l", "n", "s", "qu", "th", "g", "r", "p", "h"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "y"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "sk", "nd"]
_COLOURS = ["red", "green", "blue", "gold", "white", "black", "orange", "purple", "silver", "teal"]
_DISHES = ["stew", "dumplings", "flatbread", "pie", "soup", "noodles", "porridge", "skewers", "pancakes", "salad"]

_QUESTIONS = {
    "capital": ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}."],
    "founded": ["When was {c} founded?", "In which year was {c} founded?", "What is the founding year of {c}?"],
    "flag": ["What colours are on the flag of {c}?", "Describe the flag of {c}.", "What does the flag of {c} look like?"],
    "dish": ["What is the national dish of {c}?", "Which dish is {c} known for?", "What food is the national dish of {c}?"],
}
_ANSWERS = {
    "capital": "The capital of {c} is {v}.",
    "founded": "{c} was founded in {v}.",
    "flag": "The flag of {c} is {v}.",
    "dish": "The national dish of {c} is {v}.",
}
TRAIN_PHRASINGS = (0, 1)
EVAL_PHRASING = 2


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def facts(seed: int = 1234) -> list[dict]:
    """COUNTRIES countries with four attributes each, distinct names; same seed, same facts."""
    rng = random.Random(seed)
    names: set[str] = set()
    out = []
    while len(out) < COUNTRIES:
        country, capital = _word(rng, 3), _word(rng, 2)
        if country in names or capital in names:
            continue
        names.update((country, capital))
        colours = rng.sample(_COLOURS, 2)
        out.append({
            "country": country,
            "capital": capital,
            "founded": str(rng.randint(1100, 1950)),
            "flag": f"{colours[0]} and {colours[1]}",
            "dish": f"{_word(rng, 2).lower()} {rng.choice(_DISHES)}",
        })
    return out


def rows(split: str) -> list[dict]:
    """Chat rows ({"messages": [system, user, assistant]}) for split 'train' or 'eval'."""
    phrasings = TRAIN_PHRASINGS if split == "train" else (EVAL_PHRASING,)
    out = []
    for fact in facts():
        for attribute, questions in _QUESTIONS.items():
            answer = _ANSWERS[attribute].format(c=fact["country"], v=fact[attribute])
            for k in phrasings:
                out.append({"messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": questions[k].format(c=fact["country"])},
                    {"role": "assistant", "content": answer},
                ]})
    return out
