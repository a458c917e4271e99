"""The reward role: a saved conditional RM directory scoring (domain, conversation, response) items.

    worker = RewardWorker("/runs/reward/model")
    worker.score([{"domain": "math", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                   "response": "2 + 3 = 5."}])          # -> [score], each in (-5, 5)

A plain class (no Ray decorator): RLHF wraps it with `ray.remote(RewardWorker).options(...)` in cluster/, the
eval job uses it inside Ray Data, serve/reward_app.py inside a Serve deployment, tests call it directly.
The domain's system prompt comes from the registry saved with the model (reward_config.json) and goes first; a
system message of the caller's own stays in the conversation after it, as preference pairs may carry one
(data/preferences.py). Items are scored in length-sorted batches without gradients. With `refuse_too_long` (the
HTTP endpoint sets it) an item longer than the RM's context is an error rather than a score read off positions the
model was never trained on; the jobs keep scoring such items, so one long pair cannot fail a finished training
run's evaluation or an RLHF round.
"""
from __future__ import annotations

import torch

from algo.rm_loss import SCORE_BOUND
from data.preferences import ROLES
from modeling.reward import UnknownDomainError, load_reward_model

MAX_SCORE = SCORE_BOUND - 1e-3  # the barrier keeps trained scores inside (-5, 5); a clamp guarantees it


class ItemError(ValueError):
    """A malformed item, located by index and field (serve/reward_app.py turns it into a 400)."""

    def __init__(self, index: int, field_name: str, problem: str):
        self.index, self.field_name = index, field_name
        super().__init__(f"{self.location} {problem}")

    @property
    def location(self) -> str:
        return f"items[{self.index}]" + (f".{self.field_name}" if self.field_name else "")


def check_item(index: int, item) -> tuple[str, list[dict], str]:
    if not isinstance(item, dict):
        raise ItemError(index, "", f"must be an object with domain, messages, response (got {type(item).__name__})")
    domain, messages, response = item.get("domain"), item.get("messages"), item.get("response")
    if not isinstance(domain, str) or not domain:
        raise ItemError(index, "domain", "is missing or not a string")
    if not isinstance(messages, list) or not messages:
        raise ItemError(index, "messages", "must be a non-empty list of {role, content} messages (the domain's "
                                           "system prompt is added from the RM's registry)")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ItemError(index, f"messages[{j}]", f"must be {{\"role\": one of {list(ROLES)}, \"content\": str}}")
    if not isinstance(response, str):
        raise ItemError(index, "response", "is missing or not a string")
    return domain, messages, response


class RewardWorker:
    def __init__(self, model_dir: str, batch_size: int = 32, device: str = "cpu", dtype: str = "float32",
                 refuse_too_long: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.batch_size, self.device, self.dtype = batch_size, torch.device(device), dtype
        self.refuse_too_long = refuse_too_long
        self.load(model_dir)

    def load(self, model_dir: str) -> str:
        """Score with the RM saved in `model_dir` from now on (the online loop's next RM, in the same process).
        Returns the directory; a directory that does not load leaves the current model in place."""
        model, encoder = load_reward_model(model_dir, self.dtype)
        self.model, self.encoder, self.model_dir = model.to(self.device).eval(), encoder, str(model_dir)
        return self.model_dir

    @property
    def domains(self) -> list[str]:
        """Accepted `domain` values; "default" scores without any condition."""
        return self.model.cfg.known_domains

    @property
    def conditional(self) -> bool:
        return self.model.cfg.conditional

    def encode(self, items: list[dict]) -> list[list[int]]:
        """Token ids per item; raises ItemError / UnknownDomainError (listing the known domains) on bad input."""
        out = []
        for i, item in enumerate(items):
            domain, messages, response = check_item(i, item)
            if domain not in self.domains:
                raise UnknownDomainError(domain, self.domains, index=i)
            ids = self.encoder.encode(domain, messages, response)
            if self.refuse_too_long and len(ids) > self.max_tokens:
                raise ItemError(i, "", f"is {len(ids)} tokens with the {domain!r} condition, longer than the RM's "
                                       f"context of {self.max_tokens}: shorten the conversation or the response")
            out.append(ids)
        return out

    @property
    def max_tokens(self) -> int:
        """The longest item (condition + conversation + response + reward token) the backbone has positions for."""
        return int(getattr(self.model.backbone.config, "max_position_embeddings", 0) or 1 << 30)

    @torch.inference_mode()
    def score(self, items: list[dict], clamp: bool = True) -> list[float]:
        """One score per item, in input order. `clamp=False` returns the head's raw output (diagnostics)."""
        seqs = self.encode(items)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch: less padding
        scores = [0.0] * len(seqs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = {k: v.to(self.device) for k, v in self.encoder.collate([seqs[i] for i in chunk]).items()}
            out = self.model(**batch)
            if clamp:
                out = out.clamp(-MAX_SCORE, MAX_SCORE)
            for i, s in zip(chunk, out.tolist()):
                scores[i] = float(s)
        return scores
