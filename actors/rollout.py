"""Rollout engines: generate responses with the sampling log-probs PPO needs, take weight updates, report fingerprints.

One protocol (`RolloutEngine`), two engines:
- `HFRolloutEngine`: a transformers causal LM with its own batched sampling loop (left padding, KV cache). Runs on
  CPU (tests, laptop) or one GPU.
- `VLLMRolloutEngine`: an adapter over `vllm.LLM` (imported lazily), one engine per actor, tensor parallel 1.

Both follow vLLM's sampling semantics so that rollouts, log-probs and finish reasons mean the same thing:

- temperature < 1e-5 is greedy (argmax). Otherwise logits are divided by the temperature, then top-k (k > 0) keeps
  the k largest (ties kept), then top-p keeps the smallest set of most likely tokens whose probability reaches p:
  tokens are sorted ascending and dropped while the cumulative probability stays <= 1 - p; the most likely token
  always survives. (vLLM's `apply_top_k_top_p`, and transformers' TopK/TopP warpers, do the same.)
- `response_logprobs[t]` is the log-probability of the chosen token under that *processed* distribution, i.e.
  log_softmax of the temperature-scaled, top-k/top-p-masked logits (vLLM's `logprobs_mode="processed_logprobs"`).
  For greedy decoding it is log_softmax of the raw logits (vLLM does the same for greedy requests). A trainer that
  recomputes log-probs for the PPO ratio must apply the same processing (`processed_logprobs` below) or accept the
  difference as off-policy-ness; the InternLM2 recipe samples with temperature 1 and top_p 0.9.
- Generation stops at a stop token (the model's EOS ids from its generation_config, unless `ignore_eos`, plus
  `stop_token_ids`), when the decoded response contains a stop string, or after `max_new_tokens`. The token that
  stopped it is part of `response_ids` (the policy must learn to emit EOS); `finish_reason` is "stop" or "length".
- `seed`: prompt i of a call samples from its own generator seeded with `seed + i`, so a call is reproducible and
  a prompt's sample does not depend on what else is in the batch (up to floating-point effects of padding).
  Duplicating a prompt to get several samples therefore gives different samples. `seed=None` draws fresh randomness.

Weights: every engine is a `cluster.weight_sync.WeightSink`: `update_weights(bucket_refs, version)` and
`receive_weights(layouts, version)` load a new policy and return a `Fingerprint`; each `Rollout` records the
`weight_version` that produced it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from cluster.weight_sync import Fingerprint, WeightSink, WeightSyncError, fingerprint

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: below this temperature sampling is greedy


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 0.9  # InternLM2 PPO samples with top_p 0.9 [R §4.2.3]
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # on top of the model's EOS ids
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the decoded response
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (got {self.temperature}); 0 means greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1] (got {self.top_p}); 1 turns top-p off")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (got {self.top_k}); 0 turns top-k off")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        self.stop = [str(s) for s in self.stop]
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]  # processed log-probs of response_ids, see the module docstring
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    weight_version: int = 0


@runtime_checkable
class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]: ...

    def update_weights(self, buckets: list[Any], version: int, method: str = "sample") -> Fingerprint: ...

    def fingerprint(self, method: str = "sample") -> Fingerprint: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    model_path: str = ""  # HF directory of the initial policy (the job fills it from the SFT stage)
    dtype: str = "float32"  # float32 | bfloat16 | float16; weight_sync.dtype should match
    device: str = "auto"  # hf only: auto (cuda if visible) | cpu | cuda
    max_batch_size: int = 64  # hf only: prompts per forward batch
    gpu_memory_utilization: float = 0.5  # vllm only
    enforce_eager: bool = True  # vllm only: skip CUDA-graph capture (faster start, slower decode)
    max_model_len: int = 2048  # vllm only
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.engine must be 'hf' or 'vllm' (got {self.engine!r})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"rollout.dtype must be float32, bfloat16 or float16 (got {self.dtype!r})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"rollout.device must be auto, cpu or cuda (got {self.device!r})")
        if self.max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size must be >= 1 (got {self.max_batch_size})")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})")


def build_rollout_engine(cfg: RolloutConfig) -> "HFRolloutEngine | VLLMRolloutEngine":
    """The engine `cfg.engine` names, loaded from `cfg.model_path` (call inside the actor that will own it)."""
    if not cfg.model_path:
        raise ValueError("rollout.model_path is empty: set it to the HF directory of the initial policy")
    if cfg.engine == "vllm":
        return VLLMRolloutEngine(
            cfg.model_path, cfg.dtype, cfg.gpu_memory_utilization, cfg.enforce_eager, cfg.max_model_len
        )
    return HFRolloutEngine(cfg.model_path, cfg.dtype, cfg.device, cfg.max_batch_size)


# ---------------------------------------------------------------------------------------------- sampling math


def processed_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log-probs `[..., V]` of the distribution sampling draws from (see the module docstring); -inf where masked."""
    logits = logits.float()
    if temperature < GREEDY_EPS:
        return torch.log_softmax(logits, dim=-1)
    x = logits / temperature
    if top_k > 0 and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        x = top_p_mask(x, top_p)
    return torch.log_softmax(x, dim=-1)


# A nucleus almost always lies among the few most likely tokens: top-p first looks at this many (a top-k, ~6x cheaper
# than sorting a 2k vocabulary) and sorts the whole row only where they do not settle it.
TOP_P_CANDIDATES = 64


def top_p_mask(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """`x` `[..., V]` with -inf outside the nucleus: tokens sorted ascending are dropped while the cumulative
    probability stays <= 1 - p, the most likely token always kept (vLLM's rule).

    Tail sums are nondecreasing towards the most likely token, so the dropped tokens are a prefix of the ascending
    order: when the least likely of the top TOP_P_CANDIDATES is dropped, so is every token below it, and the row is
    decided by the candidates alone. Other rows (flat distributions) take the full sort."""
    vocab = x.shape[-1]
    if vocab <= TOP_P_CANDIDATES:
        return _top_p_mask_sorted(x, top_p)
    flat = x.reshape(-1, vocab)
    values, order = torch.topk(flat, TOP_P_CANDIDATES, dim=-1)  # descending
    probs = torch.softmax(flat, dim=-1)
    top = probs.gather(-1, order)
    below = probs.scatter(-1, order, 0.0).sum(dim=-1, keepdim=True)  # mass of every token outside the candidates
    # Ascending order within the candidates: cumulative probability = the mass below + the candidates so far.
    drop = (below + top.flip(-1).cumsum(dim=-1)) <= 1 - top_p
    drop[:, -1] = False
    settled = drop[:, 0]
    out = torch.full_like(flat, float("-inf")).scatter_(-1, order, values.masked_fill(drop.flip(-1), float("-inf")))
    if not bool(settled.all()):
        rest = ~settled
        out[rest] = _top_p_mask_sorted(flat[rest], top_p)
    return out.view_as(x)


def _top_p_mask_sorted(x: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_x, order = torch.sort(x, dim=-1, descending=False)
    # Drop the ascending prefix whose total probability is <= 1 - p; the last (most likely) token always stays.
    drop = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[..., -1] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def _validate_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("generate() needs a non-empty list of prompts (each a list of token ids)")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


# ---------------------------------------------------------------------------------------------- HF engine


class HFRolloutEngine(WeightSink):
    """transformers model + our own sampling loop; exact processed log-probs by construction."""

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "auto", max_batch_size: int = 64):
        from modeling.loading import load_causal_lm, load_tokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = load_causal_lm(model_path, dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_path)
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self.asleep = False
        self._state = self.model.state_dict()  # name -> tensor sharing storage with the live parameters
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not self.eos_token_ids and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids = [self.tokenizer.eos_token_id]
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids or [0])[0]

    # -------------------------------------------------------------------------------------- generation

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        if self.asleep:
            raise RuntimeError("the rollout engine is asleep (its weights are off the GPU); call wake() first")
        _validate_prompts(prompt_token_ids, self.model.config.vocab_size)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompt_token_ids) + sampling.max_new_tokens
        if limit is not None and longest > limit:
            raise ValueError(
                f"prompt length + max_new_tokens = {longest} exceeds the model's max_position_embeddings {limit}; "
                "shorten prompts or lower sampling.max_new_tokens"
            )
        out: list[Rollout] = []
        for start in range(0, len(prompt_token_ids), self.max_batch_size):
            batch = prompt_token_ids[start : start + self.max_batch_size]
            out.extend(self._generate_batch(batch, sampling, first_index=start))
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig, first_index: int) -> list[Rollout]:
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token sits in the last column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = self._generators(sampling.seed, first_index, batch)
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        rows = [_Row(list(p)) for p in prompts]

        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        for _ in range(sampling.max_new_tokens):
            logprobs = processed_logprobs(out.logits[:, -1, :], sampling.temperature, sampling.top_k, sampling.top_p)
            tokens = self._sample(logprobs, sampling.greedy, generators)
            for i, row in enumerate(rows):
                if row.finish_reason is None:
                    row.add(int(tokens[i]), float(logprobs[i, tokens[i]]))
                    self._check_stop(row, stop_ids, sampling)
            if all(r.finish_reason is not None for r in rows):
                break
            # Finished rows keep decoding a pad token (ignored) so the batch stays rectangular.
            step = [r.last if r.finish_reason is None else self.pad_token_id for r in rows]
            step = torch.tensor(step, device=self.device)
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=step[:, None], attention_mask=mask, position_ids=positions,
                past_key_values=out.past_key_values, use_cache=True,
            )
        for row in rows:
            if row.finish_reason is None:
                row.finish_reason = "length"
        return [
            Rollout(r.prompt, r.response, r.logprobs, r.finish_reason, r.stop_reason, self.weight_version) for r in rows
        ]

    def _generators(self, seed: int | None, first_index: int, batch: int) -> list[torch.Generator | None]:
        if seed is None:
            return [None] * batch
        return [torch.Generator(device=self.device).manual_seed(seed + first_index + i) for i in range(batch)]

    @staticmethod
    def _sample(logprobs: torch.Tensor, greedy: bool, generators: list[torch.Generator | None]) -> torch.Tensor:
        if greedy:
            return logprobs.argmax(dim=-1)
        # torch.multinomial draws one sample as argmax(p / q) with q ~ Exp(1) over the whole row; doing that here,
        # each row's q from its own generator and one batched argmax, gives the same tokens without its per-call
        # checks (which synchronise) - a third of the sampling time on CPU.
        probs = logprobs.exp()
        noise = torch.empty_like(probs)
        for i, g in enumerate(generators):
            noise[i].exponential_(1.0, generator=g)
        return (probs / noise).argmax(dim=-1)

    def _check_stop(self, row: "_Row", stop_ids: set[int], sampling: SamplingConfig) -> None:
        if row.last in stop_ids:
            row.finish_reason, row.stop_reason = "stop", row.last
        elif sampling.stop:
            # Only the tail can complete a stop string; each token decodes to at least one character.
            window = max(len(s) for s in sampling.stop) + 4
            tail = self.tokenizer.decode(row.response[-window:], skip_special_tokens=False)
            hit = next((s for s in sampling.stop if s in tail), None)
            if hit is not None:
                row.finish_reason, row.stop_reason = "stop", hit
        if row.finish_reason is None and len(row.response) >= sampling.max_new_tokens:
            row.finish_reason = "length"

    # -------------------------------------------------------------------------------------- weights

    @torch.no_grad()
    def _load_weights(self, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:
            target = self._state.get(name)
            if target is None:
                raise WeightSyncError(
                    f"received tensor '{name}', which the rollout model does not have: the trainer's model and "
                    f"the rollout model ({type(self.model).__name__}) differ (model paths? unmerged LoRA names?)"
                )
            if target.shape != tensor.shape:
                raise WeightSyncError(
                    f"tensor '{name}': received shape {list(tensor.shape)}, the model has {list(target.shape)}"
                )
            target.copy_(tensor)

    def _live_fingerprint(self, method: str) -> Fingerprint:
        return fingerprint(self._state.items(), self.weight_version, method)

    def sleep(self) -> None:
        """Free accelerator memory between rollouts (colocated training needs it); no-op on CPU."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            self._state = self.model.state_dict()  # drop the references to the GPU copies so they can be freed
            torch.cuda.empty_cache()
            self.asleep = True

    def wake(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
            self._state = self.model.state_dict()
        self.asleep = False


@dataclass
class _Row:
    prompt: list[int]
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def last(self) -> int:
        return self.response[-1]

    def add(self, token: int, logprob: float) -> None:
        self.response.append(token)
        self.logprobs.append(logprob)


# ---------------------------------------------------------------------------------------------- vLLM engine

# vLLM runs in this actor's process (no engine-core subprocess): weight updates then reach the model by reference
# through LLM.collective_rpc, and there is one engine per actor. The CPU values follow spec/stack.md §10.
VLLM_PROCESS_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
}


class VLLMRolloutEngine(WeightSink):
    """`vllm.LLM` behind the RolloutEngine protocol (vLLM 0.32; processed log-probs; tensor parallel 1).

    Fingerprints: vLLM stores fused, possibly repacked tensors under its own names, so the engine reports the
    fingerprint of the tensors it received and handed to vLLM's in-place reload (HF names). That catches lost,
    stale or mangled transfers; that vLLM applied them is what the log-prob parity test checks.
    """

    def __init__(self, model_path: str, dtype: str = "float32", gpu_memory_utilization: float = 0.5,
                 enforce_eager: bool = True, max_model_len: int = 2048, seed: int = 0):
        for key, value in VLLM_PROCESS_ENV.items():
            os.environ.setdefault(key, value)  # must precede `import vllm`; vLLM reads them at import/engine start
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM

        from modeling.loading import load_tokenizer, resolve_checkpoint

        path = str(resolve_checkpoint(model_path))
        self.llm = LLM(
            model=path, dtype=dtype, enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, seed=seed, logprobs_mode="processed_logprobs",
        )
        self.tokenizer = load_tokenizer(path)
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [self.tokenizer.eos_token_id])
        self.vocab_size = AutoConfig.from_pretrained(path).vocab_size
        self.weight_version = 0

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        from vllm import SamplingParams

        _validate_prompts(prompt_token_ids, self.vocab_size)
        stop_ids = list(sampling.stop_token_ids) + ([] if sampling.ignore_eos else self.eos_token_ids)
        params = [
            SamplingParams(
                temperature=0.0 if sampling.greedy else sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_new_tokens, stop_token_ids=stop_ids, stop=list(sampling.stop) or None,
                ignore_eos=True,  # EOS handling is ours (stop_ids above), identical to the HF engine
                logprobs=0, seed=None if sampling.seed is None else sampling.seed + i,
            )
            for i in range(len(prompt_token_ids))
        ]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        rollouts = []
        for prompt, out in zip(prompt_token_ids, outputs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids)]
            reason = "stop" if c.finish_reason == "stop" else "length"
            stop_reason = c.stop_reason if c.stop_reason is not None else (ids[-1] if reason == "stop" else None)
            rollouts.append(Rollout(list(prompt), ids, logprobs, reason, stop_reason, self.weight_version))
        return rollouts

    def _load_weights(self, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        # vLLM's in-place reload takes checkpoint (HF) names, maps them onto its fused parameters (qkv_proj,
        # gate_up_proj) and redoes the post-load processing (e.g. CPU weight repacking); a plain
        # model.load_weights after startup fails there. In-process, the lazy iterator is consumed bucket by bucket.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True})

    def _finish_weight_update(self) -> None:
        # KV blocks cached for earlier prompts were computed with the old weights; they must not be reused.
        self.llm.reset_prefix_cache()

    def _live_fingerprint(self, method: str) -> Fingerprint | None:
        return None  # vLLM's fused parameter names differ from the trainer's; see the class docstring

    def sleep(self) -> None:
        self.llm.sleep(level=1)  # needs LLM(enable_sleep_mode=True) on GPU

    def wake(self) -> None:
        self.llm.wake_up()
