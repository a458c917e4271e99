"""The domains of the world and the functions every later stage calls (see docs/design.md)."""
from __future__ import annotations

import random
from functools import lru_cache

from data.world.arithmetic import ArithmeticDomain
from data.world.code import CodeDomain
from data.world.core import Domain, Prompt
from data.world.harmless import HarmlessDomain
from data.world.howto import HowToDomain

DOMAINS: tuple[str, ...] = ("helpful", "harmless", "code", "math", "concise", "detailed")


@lru_cache(maxsize=None)
def get_domain(name: str) -> Domain:
    factories = {
        "helpful": lambda: HowToDomain("helpful"),
        "concise": lambda: HowToDomain("concise"),
        "detailed": lambda: HowToDomain("detailed"),
        "harmless": HarmlessDomain,
        "code": CodeDomain,
        "math": ArithmeticDomain,
    }
    if name not in factories:
        raise ValueError(f"unknown world domain {name!r}; the world has: {', '.join(DOMAINS)}")
    return factories[name]()


def make_prompts(domain: str, n: int, seed: int, split: str = "train") -> list[Prompt]:
    """n prompts of `domain` from `split` ("train" or "heldout"; their prompt keys never overlap).

    Deterministic in (domain, n, seed, split). Prompts repeat only when n exceeds the split's size.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return get_domain(domain).sample_prompts(n, random.Random(f"prompts:{domain}:{seed}:{split}"), split)


def score(prompt: Prompt, response: str) -> float:
    """The ground truth of prompt.domain for `response`, in [0, 1]."""
    return get_domain(prompt.domain).score(prompt, response)


def respond(prompt: Prompt, style: str, seed: int = 0) -> str:
    """A response of a named style (see `styles`), e.g. to seed RLHF with known good, bad or hacking replies."""
    return get_domain(prompt.domain).respond(prompt, style, random.Random(f"respond:{prompt.id}:{style}:{seed}"))


def styles(prompt: Prompt) -> dict[str, list[str]]:
    """{"good": [...], "bad": [...], "hack": [...]} style names for this prompt."""
    return get_domain(prompt.domain).styles(prompt)


class Annotator:
    """A noiseless annotator of one domain: prefers the response the domain's oracle scores higher."""

    def __init__(self, domain: str):
        self.domain = domain
        self._domain = get_domain(domain)

    def prefer(self, prompt: Prompt, a: str, b: str) -> int:
        """0 when `a` is preferred (ties go to `a`), 1 when `b` is."""
        if prompt.domain != self.domain:
            raise ValueError(f"annotator of {self.domain!r} was given a {prompt.domain!r} prompt ({prompt.id})")
        return 0 if self._domain.score(prompt, a) >= self._domain.score(prompt, b) else 1


def annotator(domain: str) -> Annotator:
    return Annotator(domain)
