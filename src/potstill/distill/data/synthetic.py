"""Tiny generated English-like text for tests and smoke runs.

The grammar is fixed; ``seed`` only drives sampling, so ``synthetic:0`` and
``synthetic:1`` are two independent samples of the *same* distribution (train vs
held-out). The text is lower-case with a ~60-word vocabulary and has structure a
one-layer model picks up within ~100 steps:

* subject-verb agreement (``the cat sees`` / ``the cats see``);
* fixed associations: every noun has a preferred verb and a preferred object
  (chosen 70% of the time), so bigrams are far from uniform;
* counting runs (``the king counts four five six seven .``): deterministic
  successor structure;
* small sums (``two plus three is five .``);
* copying (``the fox says red old dog and the bird says red old dog .``): the
  second phrase repeats the first, which rewards attending back (induction).
"""

from __future__ import annotations

import random

_NOUNS: list[tuple[str, str]] = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("fox", "foxes"),
    ("king", "kings"),
    ("queen", "queens"),
    ("child", "children"),
    ("farmer", "farmers"),
]
# (third-person singular, plural) forms.
_VERBS: list[tuple[str, str]] = [
    ("sees", "see"),
    ("likes", "like"),
    ("follows", "follow"),
    ("finds", "find"),
    ("helps", "help"),
    ("watches", "watch"),
]
_ADJS = ["red", "small", "old", "happy", "quiet", "green", "tall"]
_NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
# Fixed associations (part of the grammar, not of the seed): noun i prefers verb
# PREF_VERB[i] and object noun PREF_OBJ[i].
_PREF_VERB = [i % len(_VERBS) for i in range(len(_NOUNS))]
_PREF_OBJ = [(3 * i + 1) % len(_NOUNS) for i in range(len(_NOUNS))]
_P_PREFERRED = 0.7


def _pick_verb_obj(rng: random.Random, subj: int) -> tuple[int, int]:
    verb = _PREF_VERB[subj] if rng.random() < _P_PREFERRED else rng.randrange(len(_VERBS))
    obj = _PREF_OBJ[subj] if rng.random() < _P_PREFERRED else rng.randrange(len(_NOUNS))
    return verb, obj


def _noun_phrase(rng: random.Random, noun: int, plural: bool) -> str:
    word = _NOUNS[noun][1 if plural else 0]
    if rng.random() < 0.4:
        return f"the {rng.choice(_ADJS)} {word}"
    return f"the {word}"


def _sentence_svo(rng: random.Random) -> str:
    subj = rng.randrange(len(_NOUNS))
    plural = rng.random() < 0.4
    verb, obj = _pick_verb_obj(rng, subj)
    obj_phrase = _noun_phrase(rng, obj, plural=rng.random() < 0.3)
    if plural and rng.random() < 0.5:
        # A number word > 1 forces the plural noun and verb.
        n = _NUMBERS[rng.randrange(2, 10)]
        return f"{n} {_NOUNS[subj][1]} {_VERBS[verb][1]} {obj_phrase} ."
    subj_phrase = _noun_phrase(rng, subj, plural)
    return f"{subj_phrase} {_VERBS[verb][1 if plural else 0]} {obj_phrase} ."


def _sentence_count(rng: random.Random) -> str:
    start = rng.randrange(0, 14)
    length = rng.randrange(3, 8)
    run = " ".join(_NUMBERS[start + k] for k in range(length))
    return f"the {_NOUNS[rng.randrange(len(_NOUNS))][0]} counts {run} ."


def _sentence_sum(rng: random.Random) -> str:
    a = rng.randrange(0, 11)
    b = rng.randrange(0, 11)
    return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]} ."


def _sentence_copy(rng: random.Random) -> str:
    phrase = " ".join(
        rng.choice(_ADJS) if k % 2 == 0 else _NOUNS[rng.randrange(len(_NOUNS))][0]
        for k in range(rng.randrange(2, 5))
    )
    a, b = rng.sample(range(len(_NOUNS)), 2)
    return f"the {_NOUNS[a][0]} says {phrase} and the {_NOUNS[b][0]} says {phrase} ."


_SENTENCES = [_sentence_svo, _sentence_count, _sentence_sum, _sentence_copy]
_WEIGHTS = [0.55, 0.15, 0.15, 0.15]


def synthetic_texts(seed: int, n_docs: int = 200) -> list[str]:
    """Return ``n_docs`` generated documents (deterministic in ``seed``).

    Each document is 4-12 sentences (about 150-600 characters) on one or two
    lines; 200 documents are about 70k characters. Same ``seed`` -> identical
    output on every platform (``random.Random`` with an int seed is stable).
    """
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(n_docs):
        n_sent = rng.randrange(4, 13)
        sentences = [rng.choices(_SENTENCES, _WEIGHTS)[0](rng) for _ in range(n_sent)]
        # A paragraph break halfway in some documents, so newlines occur too.
        if n_sent >= 8 and rng.random() < 0.5:
            half = n_sent // 2
            doc = " ".join(sentences[:half]) + "\n" + " ".join(sentences[half:])
        else:
            doc = " ".join(sentences)
        docs.append(doc)
    return docs


def synthetic_vocabulary() -> list[str]:
    """Every word (and the ``.`` token) the grammar can emit, sorted.

    Lets tests build an exact word-level tokenizer for the synthetic corpus.
    """
    words = {".", "the", "counts", "plus", "is", "says", "and"}
    for sing, plur in _NOUNS + _VERBS:
        words.update((sing, plur))
    words.update(_ADJS)
    words.update(_NUMBERS)
    return sorted(words)
