"""Generated data of the embedding task: multi-domain (query, passage) pairs and a similarity set.

Each domain has made-up entity names (drug, doctrine, part names a general model cannot know),
each tied to one meaning; queries name the entity, passages describe its meaning without
naming it. Training and held-out pairs use different templates, so the held-out set measures
whether a model learned what a domain's names mean, not the wording. The similarity set is
graded sentence pairs for the generalisation guard: a model that collapses ranks them at random.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

DOMAINS = {
    "pharma": {
        "syllables": ["zor", "va", "ti", "nib", "lex", "ra", "mab", "pril", "do", "xa", "fen", "qui"],
        "verbs": ["relieves", "prevents", "treats", "reduces"],
        "objects": ["migraine", "asthma", "high blood pressure", "diabetes", "insomnia", "arthritis", "acne", "anemia"],
        "train_queries": ["what is {e} used for", "{e} indication", "information on {e}"],
        "heldout_queries": ["explain what {e} does", "why would a doctor prescribe {e}"],
        "train_passages": ["a medicine that {v} {o}.", "this drug {v} {o} in adults."],
        "heldout_passages": ["patients receive it because it {v} {o}."],
    },
    "legal": {
        "syllables": ["var", "holt", "ken", "drik", "ost", "mer", "lind", "quist", "brau", "tel", "sov", "ern"],
        "verbs": ["governs", "settles", "limits", "defines"],
        "objects": [
            "rental contracts",
            "patent disputes",
            "employee dismissal",
            "data privacy",
            "tax appeals",
            "child custody",
            "shipping liability",
            "copyright claims",
        ],
        "train_queries": ["what does the {e} doctrine cover", "{e} rule", "summary of the {e} principle"],
        "heldout_queries": ["when does the {e} doctrine apply", "explain the {e} precedent"],
        "train_passages": ["a legal principle that {v} {o}.", "this doctrine {v} {o} in court."],
        "heldout_passages": ["judges cite it because it {v} {o}."],
    },
    "industry": {
        "syllables": ["qz", "tor", "ax", "vel", "kor", "um", "fry", "gan", "pex", "ol", "dru", "sik"],
        "verbs": ["seals", "cools", "drives", "monitors"],
        "objects": [
            "wind turbines",
            "hydraulic presses",
            "cooling pumps",
            "conveyor belts",
            "diesel engines",
            "robot arms",
            "steam boilers",
            "paper mills",
        ],
        "train_queries": ["what is the {e} part for", "{e} component", "spec sheet of {e}"],
        "heldout_queries": ["where is a {e} installed", "what job does the {e} do"],
        "train_passages": ["a component that {v} {o}.", "this part {v} {o} in factories."],
        "heldout_passages": ["technicians fit it because it {v} {o}."],
    },
}

SUBJECTS = ["a doctor", "a child", "the farmer", "a pilot", "the teacher", "a musician", "the chef", "a dog"]
SYNONYMS = {
    "a doctor": "a physician",
    "a child": "a young kid",
    "the farmer": "the grower",
    "a pilot": "an aviator",
    "the teacher": "the instructor",
    "a musician": "a performer",
    "the chef": "the cook",
    "a dog": "a puppy",
}
ACTIONS = [
    ("reads", "a long book"),
    ("drives", "an old truck"),
    ("cooks", "a spicy soup"),
    ("paints", "a blue fence"),
    ("repairs", "a broken radio"),
    ("plays", "a quiet song"),
    ("cleans", "the kitchen floor"),
    ("feeds", "the hungry horses"),
]


@dataclass(frozen=True)
class Pair:
    query: str
    passage: str
    entity: str  # the name the query asks about: pairs of one entity are not each other's negatives


def entities(domain: str, seed: int) -> list[tuple[str, str, str]]:
    """(made-up name, verb, object) for every meaning of `domain`, the same for a given seed."""
    spec = DOMAINS[domain]
    rng = random.Random(f"{seed}:{domain}")
    names: set[str] = set()
    meanings = list(itertools.product(spec["verbs"], spec["objects"]))
    out = []
    for verb, obj in meanings:
        while True:
            name = "".join(rng.choice(spec["syllables"]) for _ in range(rng.choice((2, 3))))
            if name not in names and len(name) >= 4:
                names.add(name)
                break
        out.append((name, verb, obj))
    return out


def pairs(domain: str, seed: int, split: str) -> list[Pair]:
    """Every (query, passage) of one split (`train` or `heldout`), in a seeded order."""
    spec = DOMAINS[domain]
    out = [
        Pair(q.format(e=name), p.format(v=verb, o=obj), name)
        for name, verb, obj in entities(domain, seed)
        for q in spec[f"{split}_queries"]
        for p in spec[f"{split}_passages"]
    ]
    random.Random(f"{seed}:{domain}:{split}").shuffle(out)
    return out


def similarity_set(seed: int) -> list[tuple[str, str, float]]:
    """Sentence pairs with a graded similarity in [0, 1]: a paraphrase (synonymous subject) 1.0,
    the same subject doing something else 0.5, the same action by someone else 0.4, unrelated 0."""
    rng = random.Random(f"{seed}:similarity")
    out = []
    for i, subject in enumerate(SUBJECTS):
        verb, obj = ACTIONS[i]
        base = f"{subject} {verb} {obj}"
        other_v, other_o = ACTIONS[(i + 3) % len(ACTIONS)]
        other_s = SUBJECTS[(i + 5) % len(SUBJECTS)]
        far_v, far_o = ACTIONS[(i + 6) % len(ACTIONS)]
        out += [
            (base, f"{SYNONYMS[subject]} {verb} {obj}", 1.0),
            (base, f"{subject} {other_v} {other_o}", 0.5),
            (base, f"{other_s} {verb} {obj}", 0.4),
            (base, f"{SUBJECTS[(i + 2) % len(SUBJECTS)]} {far_v} {far_o}", 0.0),
        ]
    rng.shuffle(out)
    return out
