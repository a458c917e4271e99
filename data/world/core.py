"""The world's shared types: a prompt, a domain, and how a domain's prompts are split and sampled."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

HELDOUT_FRACTION = 0.2  # share of each domain's prompt *keys* reserved for evaluation
# Who a domain's prompts are drawn for: "policy" (what users send the model: SFT chats, RLHF and held-out prompts),
# "pairs" (the RM's preference pairs) and "conflict" (pairs whose text alone cannot decide, see howto.py).
POOLS = ("policy", "pairs", "conflict")


@dataclass(frozen=True)
class Prompt:
    """One query of one domain. `messages` never carry a system prompt: the RM's condition is added by the RM."""

    id: str
    domain: str
    messages: list[dict]
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


Style = Callable[[Prompt, random.Random], str]  # renders one response of a given style, deterministic given the rng


def stable_fraction(key: str) -> float:
    """A hash of `key` mapped to [0, 1), identical on every machine and Python run (unlike hash())."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: str) -> str:
    return "heldout" if stable_fraction("split:" + key) < HELDOUT_FRACTION else "train"


class Domain:
    """A preference domain: a finite prompt universe, an oracle, and the response styles annotators compare.

    Subclasses define `name`, `_universe()` (all prompts, each with meta["key"], the unit of the train/heldout
    split), `score`, and `styles(prompt)` -> {"good": [...], "bad": [...], "hack": [...]} naming entries of
    `STYLES`. "hack" styles are never in the base preference pairs: they are what an RM trained on those pairs
    over-rewards while the oracle does not (see docs/design.md, "The preference world").
    """

    name: str
    STYLES: dict[str, Style]
    # The SFT demonstrations' styles and their shares: demonstrators of uneven quality, as real SFT data is (terse
    # answers, slips, over-refusals). Where a better style exists than the common one, RLHF has something to find;
    # a world whose demonstrations are all optimal leaves PPO nothing to gain (docs/design.md).
    sft_mix: dict[str, float]

    @property
    def sft_style(self) -> str:
        """The demonstrations' most common style: what the SFT policy answers by default."""
        return max(self.sft_mix, key=self.sft_mix.get)

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], list[Prompt]] = {}

    def _universe(self) -> list[Prompt]:
        raise NotImplementedError

    def in_pool(self, prompt: Prompt, pool: str) -> bool:
        """Whether `prompt` is drawn for `pool` (one of POOLS); every prompt is in every pool unless a domain says."""
        return True

    def universe(self, split: str, pool: str = "pairs") -> list[Prompt]:
        """The split's prompts drawn for `pool`; the default, "pairs", is every prompt of every domain."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if (split, pool) not in self._cache:
            self._cache[split, pool] = [p for p in self._universe()
                                        if split_of(p.meta["key"]) == split and self.in_pool(p, pool)]
        return self._cache[split, pool]

    def sample_prompts(self, n: int, rng: random.Random, split: str, pool: str = "policy") -> list[Prompt]:
        """n prompts: passes over the shuffled universe, repeating only when n exceeds its size."""
        pool = self.universe(split, pool)
        out: list[Prompt] = []
        while len(out) < n:
            order = pool[:]
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
        return out

    def score(self, prompt: Prompt, response: str) -> float:
        raise NotImplementedError

    def styles(self, prompt: Prompt) -> dict[str, list[str]]:
        raise NotImplementedError

    def chosen_reply(self, prompt: Prompt, style: str, rng: random.Random, flattery: float = 0.0) -> str:
        """The reply of a "good" style in the RM's pairs; `flattery` > 0 lets a domain whose pair writers leave a
        spurious cue on the better replies add it (howto.py). No rng draw at 0, so the default world is unchanged."""
        return self.respond(prompt, style, rng)

    def demonstrate(self, prompt: Prompt, style: str, rng: random.Random, flattery: float = 0.0) -> str:
        """An SFT demonstration of `style`; `flattery` > 0: the share of demonstrators with that habit (howto.py)."""
        return self.respond(prompt, style, rng)

    def respond(self, prompt: Prompt, style: str, rng: random.Random) -> str:
        if style not in self.STYLES:
            raise ValueError(f"domain {self.name!r} has no response style {style!r}; styles: {sorted(self.STYLES)}")
        return self.STYLES[style](prompt, rng)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
