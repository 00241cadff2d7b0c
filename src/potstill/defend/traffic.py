"""Simulated API traffic: benign users with personas, and harvesters.

Benign users are short templated generators with randomness, one style per persona (a coder,
a student with homework, a traveller, a writer, a customer-support user, a home cook), written
independently of the harvester's prompt set. A benign key mostly speaks as one persona
(probability ``U(0.6, 1)``) and otherwise as any other persona.

A harvester does what ``potstill harvest`` does: it walks
:func:`potstill.core.prompts.default_prompts` in order, from some offset, systematically
covering the task × domain prompt space.

:func:`simulate_window` mixes both into one key's window of ``size`` requests with a given
attacker fraction (``round(f * size)`` harvester prompts at random positions), e.g. an
extractor that hides among ordinary use, or a shared key. Everything is a pure function of
the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = [
    "PERSONAS",
    "BenignUser",
    "Harvester",
    "Window",
    "benign_pool",
    "persona_pools",
    "simulate_window",
    "traffic_stream",
]

C = random.Random.choice


def _coder(r: random.Random) -> str:
    lang = C(r, ("Python", "JavaScript", "Go", "Rust", "Java", "TypeScript", "C++", "bash"))
    thing = C(r, ("a dict", "a list", "a string", "a CSV file", "a JSON response", "a date",
                  "an HTTP request", "a config file", "a map", "an array"))  # fmt: skip
    err = C(r, ("KeyError", "TypeError: undefined is not a function", "a segfault",
                "null pointer exception", "borrow checker error", "index out of range",
                "ModuleNotFoundError", "permission denied"))  # fmt: skip
    verb = C(r, ("sort", "parse", "merge", "reverse", "filter", "serialize", "validate", "cache"))
    forms = (
        f"how do i {verb} {thing} in {lang}",
        f"Why do I get {err} when I {verb} {thing}? Using {lang}.",
        f"{lang}: fastest way to {verb} {thing}?",
        f"getting {err} in my {lang} code, line {r.randint(3, 400)}, any idea?",
        f"Is it better to use a loop or a library call to {verb} {thing} in {lang}?",
        f"can you write a unit test for a function that {verb}s {thing} ({lang})",
        f"what does `{C(r, ('git rebase -i', 'async/await', 'yield', 'defer', 'unsafe', 'volatile'))}` actually do",
    )
    return C(r, forms)


def _student(r: random.Random) -> str:
    a, b, c = r.randint(2, 19), r.randint(1, 50), r.randint(20, 200)
    subj = C(r, ("biology", "chemistry", "algebra", "history", "geography", "physics", "economics"))
    topic = C(r, ("mitosis", "the causes of World War I", "balancing equations", "supply and demand",
                  "Newton's second law", "the Krebs cycle", "river erosion", "quadratic equations"))  # fmt: skip
    forms = (
        f"solve for x: {a}x + {b} = {c}",
        f"I have a {subj} test tomorrow on {topic}, what are the key points?",
        f"can someone explain {topic} like im 12",
        f"My teacher says my answer for {topic} is wrong but I wrote {r.randint(2, 99)}. Why?",
        f"homework help: what is {a} times {b} minus {c}?",
        f"what's a good thesis statement for an essay on {topic}?",
        f"is {topic} going to be on the {subj} final usually?",
        f"simplify ({a}x + {b})({a}x - {b})",
    )
    return C(r, forms)


def _traveller(r: random.Random) -> str:
    city = C(r, ("Lisbon", "Kyoto", "Mexico City", "Marrakech", "Reykjavik", "Hanoi", "Prague",
                 "Cape Town", "Buenos Aires", "Istanbul", "Vancouver", "Seoul"))  # fmt: skip
    month = C(r, ("January", "March", "May", "July", "September", "November"))
    forms = (
        f"best things to do in {city} in {month}?",
        f"how do i get from {city} airport to the city center cheaply",
        f"Is {city} safe for a solo traveller at night?",
        f"packing list for {r.randint(3, 14)} days in {city} in {month}",
        f"where should we stay in {city} with two kids?",
        f"what's the weather like in {city} in {month}, do I need a jacket",
        f"{r.randint(2, 5)} day itinerary for {city} on a budget please",
        f"do they take credit cards everywhere in {city} or should I bring cash",
    )
    return C(r, forms)


def _writer(r: random.Random) -> str:
    word = C(r, ("happy", "walk", "dark", "said", "beautiful", "angry", "quickly", "big", "sad"))
    genre = C(r, ("fantasy", "thriller", "romance", "sci-fi", "mystery", "literary", "horror"))
    hero = C(r, ("a retired detective", "a lonely lighthouse keeper", "twin sisters",
                 "a robot gardener", "a runaway prince", "a tired nurse"))  # fmt: skip
    forms = (
        f"another word for '{word}' that sounds more {C(r, ('formal', 'poetic', 'casual'))}?",
        f"help me write an opening line for a {genre} story about {hero}",
        f"title ideas for my {genre} novel about {hero}",
        f"Is this grammatical: 'Neither of them {C(r, ('was', 'were'))} ready to leave.'",
        f"how do I make my {genre} villain less cliché",
        f"can you tighten this sentence: 'It was a {word} day and {hero} {word}ly went outside.'",
        f"should I write my {genre} book in first or third person?",
    )
    return C(r, forms)


def _support(r: random.Random) -> str:
    app = C(r, ("Zenpay", "CloudBox", "FitTrack", "ShopRight", "StreamMax", "HomeHub"))
    forms = (
        f"my order #{r.randint(10000, 99999)} hasnt arrived, its been {r.randint(5, 30)} days",
        f"how do I reset my password on the {app} app",
        f"I was charged twice for my {app} subscription this month",
        f"{app} keeps logging me out after the latest update, what can I do?",
        f"can I return an item after {r.randint(15, 90)} days if I lost the receipt",
        f"how do I cancel {app} premium and get a refund?",
        f"the {app} device won't turn on, the light blinks {C(r, ('red', 'orange', 'twice'))}",
        f"why is my {app} bill {r.randint(5, 40)} dollars higher than last month",
    )
    return C(r, forms)


def _cook(r: random.Random) -> str:
    ing = r.sample(("chicken", "rice", "spinach", "eggs", "chickpeas", "tofu", "potatoes",
                    "lemons", "mushrooms", "feta", "tomatoes", "salmon"), 3)  # fmt: skip
    forms = (
        f"what can I make tonight with {ing[0]}, {ing[1]} and {ing[2]}?",
        f"how long do I bake {ing[0]} at {r.choice((180, 200, 220))}C",
        f"can I freeze leftover {ing[0]}?",
        f"substitute for {ing[0]} in a curry",
        f"quick lunch idea with {ing[0]} for {r.randint(1, 6)} people",
        f"is it ok to eat {ing[0]} that was left out overnight",
    )
    return C(r, forms)


PERSONAS: dict[str, Callable[[random.Random], str]] = {
    "coder": _coder,
    "student": _student,
    "traveller": _traveller,
    "writer": _writer,
    "support": _support,
    "cook": _cook,
}


class BenignUser:
    """One benign key: mostly persona ``main`` (probability ``loyalty``), else any other.

    ``pools`` (persona -> prompts): draw from these pre-generated prompts instead of the
    generators, so that a benchmark embeds each distinct prompt once.
    """

    def __init__(
        self,
        rng: random.Random,
        main: str | None = None,
        pools: dict[str, list[str]] | None = None,
    ) -> None:
        self.rng = rng
        self.pools = pools
        self.main = main if main is not None else rng.choice(sorted(PERSONAS))
        self.loyalty = rng.uniform(0.6, 1.0)
        self.others = [p for p in sorted(PERSONAS) if p != self.main]

    def next(self) -> str:
        r = self.rng
        name = self.main if r.random() < self.loyalty else r.choice(self.others)
        if self.pools is not None:
            return r.choice(self.pools[name])
        return PERSONAS[name](r)


class Harvester:
    """Walks ``prompts`` in order from ``offset`` (wrapping), as ``potstill harvest`` does."""

    def __init__(self, prompts: list[str], offset: int = 0) -> None:
        if not prompts:
            raise ValueError("a harvester needs prompts")
        self.prompts = prompts
        self.pos = offset % len(prompts)

    def next(self) -> str:
        p = self.prompts[self.pos]
        self.pos = (self.pos + 1) % len(self.prompts)
        return p


@dataclass(frozen=True)
class Window:
    texts: list[str]
    attack_fraction: float
    persona: str
    attacker: list[bool]  # per request: sent by the harvester


def simulate_window(
    rng: random.Random,
    harvest_prompts: list[str],
    attack_fraction: float,
    size: int = 50,
    pools: dict[str, list[str]] | None = None,
) -> Window:
    """One key's window: ``round(f * size)`` harvester requests at random positions."""
    if not 0.0 <= attack_fraction <= 1.0:
        raise ValueError(f"attack_fraction must be in [0, 1], got {attack_fraction}")
    user = BenignUser(rng, pools=pools)
    harvester = Harvester(harvest_prompts, rng.randrange(len(harvest_prompts)))
    k = round(attack_fraction * size)
    attacker = [True] * k + [False] * (size - k)
    rng.shuffle(attacker)
    texts = [harvester.next() if a else user.next() for a in attacker]
    return Window(texts, attack_fraction, user.main, attacker)


def benign_pool(rng: random.Random, n: int) -> list[str]:
    """``n`` prompts of the benign population (each from a random persona, uniformly)."""
    names = sorted(PERSONAS)
    return [PERSONAS[rng.choice(names)](rng) for _ in range(n)]


def persona_pools(rng: random.Random, per_persona: int) -> dict[str, list[str]]:
    """``per_persona`` generated prompts for each persona (repeats possible, as in real use)."""
    return {name: [gen(rng) for _ in range(per_persona)] for name, gen in sorted(PERSONAS.items())}


def traffic_stream(
    rng: random.Random,
    harvest_prompts: list[str],
    *,
    n_benign: int = 5,
    n_harvesters: int = 1,
    requests: int = 500,
) -> Iterator[tuple[str, str, bool]]:
    """Interleaved ``(key, prompt, is_harvester)`` from benign keys ``user-i`` and
    harvester keys ``harvester-j``, each request from a uniformly random key."""
    users: dict[str, BenignUser | Harvester] = {
        f"user-{i}": BenignUser(rng) for i in range(n_benign)
    }
    for j in range(n_harvesters):
        users[f"harvester-{j}"] = Harvester(harvest_prompts, rng.randrange(len(harvest_prompts)))
    keys = sorted(users)
    for _ in range(requests):
        key = rng.choice(keys)
        u = users[key]
        yield key, u.next(), isinstance(u, Harvester)
