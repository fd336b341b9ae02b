"""Uneven federations for tests: four sites, each holding text in its own language, of very different sizes."""

from __future__ import annotations

import random
from pathlib import Path

# A few everyday sentences per language; documents are seeded draws of them, so each site's
# text has its language's letters, words and sentence shapes (and a byte model can learn them).
SENTENCES = {
    "en": [
        "The weather is nice today and we are going to the park.",
        "She reads a book every evening before she goes to sleep.",
        "The train to the city leaves at eight in the morning.",
        "We need to buy bread, milk and some apples at the shop.",
        "My brother works in a hospital near the river.",
        "The children played football in the garden after school.",
        "Please close the window, it is getting cold in here.",
        "He wrote a long letter to his grandmother last week.",
    ],
    "de": [
        "Das Wetter ist heute schön und wir gehen in den Park.",
        "Sie liest jeden Abend ein Buch, bevor sie schlafen geht.",
        "Der Zug in die Stadt fährt um acht Uhr morgens ab.",
        "Wir müssen Brot, Milch und ein paar Äpfel im Laden kaufen.",
        "Mein Bruder arbeitet in einem Krankenhaus am Fluss.",
        "Die Kinder spielten nach der Schule Fußball im Garten.",
        "Bitte schließ das Fenster, es wird hier drinnen kalt.",
        "Er hat letzte Woche seiner Großmutter einen langen Brief geschrieben.",
    ],
    "fi": [
        "Tänään on kaunis sää ja menemme puistoon.",
        "Hän lukee kirjaa joka ilta ennen nukkumaanmenoa.",
        "Juna kaupunkiin lähtee kahdeksalta aamulla.",
        "Meidän täytyy ostaa kaupasta leipää, maitoa ja omenoita.",
        "Veljeni työskentelee sairaalassa joen lähellä.",
        "Lapset pelasivat jalkapalloa puutarhassa koulun jälkeen.",
        "Sulje ikkuna, täällä sisällä alkaa olla kylmä.",
        "Hän kirjoitti viime viikolla pitkän kirjeen isoäidilleen.",
    ],
    "sv": [
        "Vädret är fint i dag och vi går till parken.",
        "Hon läser en bok varje kväll innan hon somnar.",
        "Tåget till staden går klockan åtta på morgonen.",
        "Vi måste köpa bröd, mjölk och några äpplen i affären.",
        "Min bror arbetar på ett sjukhus nära floden.",
        "Barnen spelade fotboll i trädgården efter skolan.",
        "Stäng fönstret, det börjar bli kallt här inne.",
        "Han skrev ett långt brev till sin mormor förra veckan.",
    ],
}


def write_text(path: Path, language: str, size: int, seed: int) -> Path:
    """About `size` bytes of `language`, one document (2-5 sentences) per line."""
    rng = random.Random(f"{seed}-{language}")
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(SENTENCES[language]) for _ in range(rng.randint(2, 5)))
        lines.append(line)
        total += len(line.encode()) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# The smallest site a third of the largest, as in the reported run. With these shards and rounds,
# site_sv's round 1 is the short last shard of its epoch: 10 sequences, less than a step of 32.
SIZES = {"en": 6000, "de": 4500, "fi": 3000, "sv": 2000}


def uneven_config(
    out: Path, sizes: dict[str, int] = SIZES, run: str = "uneven", rounds: int = 2, **rounds_opts
) -> dict:
    """One site per language, each holding (pinning) `sizes[language]` bytes of its text."""
    sources = []
    for lang, size in sizes.items():
        path = write_text(out / "text" / f"{lang}.txt", lang, size, seed=11)
        sources.append(
            {
                "name": lang,
                "path": str(path),
                "format": "text",
                "split": "line",
                "domain": lang,
                "language": lang,
                "site": f"site_{lang}",
            }
        )
    return {
        "run": run,
        "seed": 5,
        "output_dir": str(out / "results"),
        "sites": {f"site_{lang}": {"accelerator": "cpu", "memory_gb": 4, "throughput": 1.0} for lang in sizes},
        "data": {"sources": sources, "tokenizer": {"kind": "byte"}, "shard_tokens": 1200, "heldout_fraction": 0.1},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32},
        "training": {"batch_tokens": 1024, "max_micro_batch": 16, "lr": 0.01, "warmup_fraction": 0.0, "log_every": 4},
        "rounds": {"count": rounds, "tokens_per_round": 8000, "deadline_minutes": 5, "quorum": 1.0, **rounds_opts},
        "evaluation": {"tokens_per_domain": 512},
        "tracking": {"mlflow": False},
    }
