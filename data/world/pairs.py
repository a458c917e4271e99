"""Preference pairs drawn from the world: base pairs per domain, conflict pairs, SFT conversations.

A base pair = one prompt, one response of a "good" style and one of a "bad" style for that prompt, ordered by
the domain's annotator (never by the style names) and dropped when the annotator sees a tie. Rows use the
coolray preference format (data/preferences.py): messages, chosen, rejected, domain, plus provenance.
"""
from __future__ import annotations

import hashlib
import random

from data.world.core import Prompt
from data.world.registry import DOMAINS, annotator, get_domain

CONFLICT_DOMAINS = ("concise", "detailed")  # on the plain how-to wording: opposite preferences on (short, detailed)
CONFLICT_STYLES = ("short", "detailed")
HOWTO_DOMAINS = ("helpful", *CONFLICT_DOMAINS)


def _rng(*parts) -> random.Random:
    seed = int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")
    return random.Random(seed)


def pair_id(prompt: Prompt, a: str, b: str) -> str:
    digest = hashlib.sha256(f"{prompt.id}\x00{a}\x00{b}".encode()).hexdigest()[:12]
    return f"{prompt.id}#{digest}"


def _row(prompt: Prompt, chosen: str, rejected: str, chosen_style: str, rejected_style: str, pid: str) -> dict:
    return {
        "id": pid, "domain": prompt.domain, "prompt_id": prompt.id, "messages": prompt.messages,
        "chosen": chosen, "rejected": rejected, "chosen_style": chosen_style, "rejected_style": rejected_style,
    }


def preference_pairs(domain: str, n: int, seed: int, split: str = "train", flattery: float = 0.0) -> list[dict]:
    """n labelled pairs of `domain` (fewer only if the annotator keeps tying, which the world never does).
    `flattery`: the share of good-style replies whose writer opens with flattery (how-to domains; 0 = never)."""
    dom = get_domain(domain)
    judge = annotator(domain)
    rng = _rng("pairs", domain, seed, split)
    rows: list[dict] = []
    for _ in range(4):  # a tie drops the pair; top up a few times
        for prompt in dom.sample_prompts(n - len(rows), rng, split, pool="pairs"):
            styles = dom.styles(prompt)
            good_style, bad_style = rng.choice(styles["good"]), rng.choice(styles["bad"])
            a, b = dom.chosen_reply(prompt, good_style, rng, flattery), dom.respond(prompt, bad_style, rng)
            if rng.random() < 0.5:  # present in random order: the annotator, not the position, decides
                (a, good_style), (b, bad_style) = (b, bad_style), (a, good_style)
            if dom.score(prompt, a) == dom.score(prompt, b):
                continue
            first_wins = judge.prefer(prompt, a, b) == 0
            chosen, rejected = (a, b) if first_wins else (b, a)
            cs, rs = (good_style, bad_style) if first_wins else (bad_style, good_style)
            rows.append(_row(prompt, chosen, rejected, cs, rs, pair_id(prompt, a, b)))
        if len(rows) >= n:
            break
    return rows


def conflict_pairs(n: int, seed: int, split: str = "heldout") -> list[dict]:
    """n conflicts, each as two rows (one per CONFLICT_DOMAINS) over the same prompt text and responses.

    Row k of concise and row k of detailed share `conflict_id`; their chosen/rejected are swapped.
    """
    rng = _rng("conflict", seed, split)
    base = get_domain(CONFLICT_DOMAINS[0]).sample_prompts(n, rng, split, pool="conflict")
    rows = []
    for k, p in enumerate(base):
        texts = {s: get_domain(CONFLICT_DOMAINS[0]).respond(p, s, rng) for s in CONFLICT_STYLES}
        for domain in CONFLICT_DOMAINS:
            prompt = Prompt(p.id.replace(p.domain, domain, 1), domain, p.messages, p.meta)
            judge = annotator(domain)
            a, b = texts["short"], texts["detailed"]
            first_wins = judge.prefer(prompt, a, b) == 0
            chosen, rejected = (a, b) if first_wins else (b, a)
            cs, rs = CONFLICT_STYLES if first_wins else CONFLICT_STYLES[::-1]
            row = _row(prompt, chosen, rejected, cs, rs, f"conflict-{k}-{domain}")
            row["conflict_id"] = k
            rows.append(row)
    return rows


def sft_conversations(n: int, seed: int, flattery: float = 0.0) -> list[dict]:
    """n single-turn chats `{"messages": [user, assistant]}`, each reply of a style drawn from the domain's
    `sft_mix` (mostly adequate, some better, some wrong: the SFT policy inherits that spread, RLHF narrows it).

    The domains take turns, except that helpful, concise and detailed (all how-to questions: plain, asking for a
    short answer, asking for reasons) share one turn, so the how-to share of the chats is that of one domain.
    `flattery`: the share of how-to demonstrations that open with flattery (0 = none).
    """
    rng = _rng("sft", seed)
    turns = [[d] if d not in HOWTO_DOMAINS else list(HOWTO_DOMAINS) for d in DOMAINS if d not in CONFLICT_DOMAINS]
    rows = []
    for i in range(n):
        dom = get_domain(rng.choice(turns[i % len(turns)]))
        prompt = dom.sample_prompts(1, rng, "train")[0]
        style = rng.choices(list(dom.sft_mix), weights=list(dom.sft_mix.values()))[0]
        reply = dom.demonstrate(prompt, style, rng, flattery)
        rows.append({"messages": prompt.messages + [{"role": "assistant", "content": reply}]})
    rng.shuffle(rows)
    return rows
