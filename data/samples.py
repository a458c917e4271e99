"""Shippable text for bootstrapping: Python standard-library docstrings (PSF licence) on this machine."""
from __future__ import annotations

import importlib
import inspect

_MODULES = [
    "json", "os", "pathlib", "collections", "functools", "itertools", "re", "string", "textwrap", "datetime",
    "random", "statistics", "math", "heapq", "bisect", "dataclasses", "typing", "argparse", "logging", "csv",
    "shutil", "tempfile", "unittest", "difflib", "enum", "fractions", "decimal", "calendar", "zipfile", "gzip",
]


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings of stdlib modules and their public members, deduplicated, in a stable order."""
    seen: set[str] = set()
    out: list[str] = []
    for name in _MODULES:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)) else None
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


def tokenizer_training_texts() -> list[str]:
    """Enough varied text to train a small BPE, plus ChatML-shaped lines so chat markup tokenizes compactly."""
    chat = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
    ] * 20
    return stdlib_docstrings() + chat


# ---------------------------------------------------------------------------------------------- synthetic prose
# Plain English "local news" paragraphs from templates with many slot fillers, so that two generated articles
# share almost no word 5-grams (they must not look like near-duplicates of each other) while each reads as
# ordinary prose (it must pass the corpus rule and quality filters).

_FIRST = """Ada Alan Amira Ben Carla Chen Dario Elena Farid Grace Hana Ivan Jonas Kara Leo Lina Marco Maya Nadia
Omar Paula Quinn Rosa Sami Tara Uma Victor Wen Yara Zoe Hugo Ines Kofi Lea Mateo Nora Priya Ravi Sofia Theo""".split()
_LAST = """Abbott Baker Castillo Dubois Eriksen Fischer Garcia Hansen Ito Jensen Kowalski Larsen Moreau Novak Okafor
Petrov Quist Rossi Silva Tanaka Urban Varga Weber Xu Yilmaz Zimmer Brennan Costa Duarte Lindqvist""".split()
_TOWN_A = "Ash Bell Cold Deer Elm Fern Glen High Iron Kings Long Mill North Oak Red Rose Salt Stone West Wild".split()
_TOWN_B = "brook bury dale field ford gate haven holm hurst marsh mere moor port stead ton vale well wick wood".split()
_PLACES = [
    "bakery", "library", "harbour", "orchard", "observatory", "railway station", "museum", "garden", "workshop",
    "market hall", "bridge", "lighthouse", "pottery studio", "community kitchen", "bicycle shop", "bookshop",
    "weather station", "boatyard", "clinic", "town archive",
]
_ADJ = """quiet busy narrow sunny windy old modest bright careful patient crowded cheerful sturdy tidy remote
familiar humble generous curious steady ancient gentle lively""".split()
_MATERIAL = "timber stone glass copper rope paint brick slate clay canvas wool paper".split()
_THING = """roof windows benches shelves records lamps tools maps boats clocks ovens lanterns fences stairs
tables doors bells gates""".split()
_TIME = "morning afternoon evening spring summer autumn winter".split()
_DAY = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_FEELING = "proud relieved surprised hopeful grateful tired delighted cautious".split()
_ACTIVITY = [
    "reading groups", "repair evenings", "cooking classes", "music lessons", "chess matches", "craft fairs",
    "history talks", "walking tours", "seed swaps", "film nights",
]

_TEMPLATES = [
    "In {year}, {name} opened a small {place} near the {adj} end of {town}.",
    "Visitors often say that the {place} feels {adj} in the {time}.",
    "The council agreed to repair the {thing} after {num} residents signed a letter.",
    "{name} later explained that the hardest part was finding enough {material} for the {thing}.",
    "Most of the work was done by volunteers who came every {day} with tools and sandwiches.",
    "According to {name2}, the old {thing} had not been replaced since {year2}.",
    "By the end of the {time}, more than {num} people had visited the {place}.",
    "Children from the {adj} school nearby now come on {day}s for {activity}.",
    "Nobody expected the {place} in {town} to become so popular so quickly.",
    "{name} is {feeling} about the future, although money is still tight.",
    "A grant of {num} pounds paid for new {thing} and a coat of paint.",
    "The building was once a warehouse for {material}, and some of the old beams are still visible.",
    "Every {time} the team organises {activity}, which are free for anyone who wants to join.",
    "Local historians believe the site was first used as a {place} around {year2}.",
    "When the storm damaged the {thing}, neighbours from {town} arrived within an hour to help.",
    "{name2} keeps a notebook of every visitor who asks a question about the {thing}.",
    "The next project is a {adj} reading room on the first floor, planned for {year}.",
    "Some residents worried about the noise, but most now agree the {place} was a good idea.",
    "The {thing} were rebuilt with {material} taken from a barn that had fallen down.",
    "Last {time}, {name} and {name2} walked {num} miles to collect donations for the {place}.",
    "It is one of the few places in {town} where you can still hear the {adj} bells of the old church.",
    "The opening hours change in {time}, so it is worth checking the notice by the door.",
    "Several families from {town} have helped since the first {day} it opened.",
    "Nobody is paid, and {name} insists that this is what keeps the {place} {adj}.",
    "A photograph from {year2} shows the same {thing} covered in snow.",
    "Plans for a second {place} in {town2} are being discussed this {time}.",
    "The cost of {material} has risen, which has slowed the work on the {thing}.",
    "On {day} mornings the queue reaches the corner of the street.",
    "{name} hopes that the {place} will still be open when her grandchildren are grown.",
    "Students from the college recorded interviews with {num} people who remember the old {thing}.",
]


def _town(rng) -> str:
    return rng.choice(_TOWN_A) + rng.choice(_TOWN_B)


def synthetic_article(rng) -> str:
    """One article: 2-3 paragraphs of 3-5 template sentences each, one paragraph per line."""
    slots = {
        "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", "town": _town(rng), "place": rng.choice(_PLACES),
    }
    paragraphs = []
    for _ in range(rng.randint(2, 3)):
        sentences = []
        for template in rng.sample(_TEMPLATES, rng.randint(3, 5)):
            fill = {
                **slots, "name2": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", "town2": _town(rng),
                "adj": rng.choice(_ADJ), "material": rng.choice(_MATERIAL), "thing": rng.choice(_THING),
                "time": rng.choice(_TIME), "day": rng.choice(_DAY), "feeling": rng.choice(_FEELING),
                "activity": rng.choice(_ACTIVITY), "year": rng.randint(1990, 2024),
                "year2": rng.randint(1850, 1989), "num": rng.randint(12, 4000),
            }
            sentences.append(template.format(**fill))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def synthetic_articles(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [synthetic_article(rng) for _ in range(n)]
