"""What the OpenAI server needs from an inference engine, and the text bookkeeping engines share.

An engine is built from `(model_path, its own config)`, loads in `load()` (blocking, run off the event loop), and
streams one request's output as `Chunk`s. The server never touches torch or vLLM directly, so tests can inject any
engine that honours this protocol.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed + same prompt + same options -> same text, whatever else is in the batch
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")


@dataclass
class Chunk:
    """A piece of one request's output. `completion_tokens` is cumulative; the last chunk has a finish_reason."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (eos / stop string) | "length" (max_tokens)


@runtime_checkable
class Engine(Protocol):
    tokenizer: Any  # a transformers tokenizer with the model's chat template; set by load()
    max_model_len: int  # prompt + completion tokens the model can attend to; set by load()

    def load(self) -> None: ...

    def stream(self, prompt_ids: list[int], options: SamplingOptions) -> AsyncIterator[Chunk]: ...

    async def shutdown(self) -> None: ...


def stop_token_ids(tokenizer, generation_eos: int | list[int] | None, extra_tokens: tuple[str, ...]) -> set[int]:
    """Token ids that end a completion: the generation config's eos ids, the tokenizer's eos, and e.g. `<|im_end|>`
    (ChatML ends every assistant turn with it, and base tokenizers do not call it eos)."""
    ids: set[int] = set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(int(i) for i in generation_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in extra_tokens if t in vocab)
    return ids


@dataclass
class TextAssembler:
    """Turns one request's growing token list into text deltas, honouring stop strings.

    Byte-level BPE can split a character over tokens, so a trailing U+FFFD is held back until the next token
    completes it. With stop strings, the last `len(longest stop) - 1` characters are held back too: they might be
    the start of a stop string that the next tokens complete, and OpenAI never returns the stop string itself.
    """

    tokenizer: Any
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the final text already handed out
    finish_reason: str | None = None

    def add(self, token_id: int, is_stop_token: bool, max_tokens: int) -> str:
        """Record one generated token; returns the newly releasable text (possibly "")."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if is_stop_token:
            self.finish_reason = "stop"
        cut = self._first_stop(text)
        if cut is not None:
            self.finish_reason = "stop"
            text = text[:cut]
        elif self.finish_reason is None and len(self.token_ids) >= max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None:
            text = self._releasable(text)
        return self._take(text)

    def finish(self, reason: str) -> str:
        """End the request early (e.g. the model's context is full); flush whatever was held back."""
        self.finish_reason = self.finish_reason or reason
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        return self._take(text if cut is None else text[:cut])

    def _first_stop(self, text: str) -> int | None:
        # Search only where a new match can start: stop strings wholly inside released text were checked before.
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _releasable(self, text: str) -> str:
        text = text.rstrip("\ufffd")
        hold = max((len(s) for s in self.stop), default=1) - 1
        return text[: len(text) - hold] if hold > 0 else text

    def _take(self, text: str) -> str:
        delta = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        return delta
