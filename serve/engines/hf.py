"""CPU engine: transformers `generate` on batches of concurrent requests, optionally int8-quantized.

Concurrent requests are gathered by `@serve.batch` (up to `max_batch_size`, waiting at most
`batch_wait_timeout_s`) into one left-padded `generate` call that runs in a worker thread while the event loop keeps
accepting requests. This is static batching: a batch runs until its last member finishes, and requests arriving
meanwhile form the next batch (vLLM's continuous batching is the GPU engine's job).

Two hooks make one `generate` call serve requests with different settings:
  - `_RowSampler` (a LogitsProcessor) samples each row with its own temperature / top_p / seeded generator and
    returns one-hot scores, so generate's greedy argmax picks exactly that token. HF's own sampling draws all rows
    from one global RNG, so a row's draws would depend on its batch mates.
  - `_RowTracker` (a StoppingCriteria, called once per step with every row's newest token) ends rows on eos,
    stop strings, their own max_tokens or client disconnects, and publishes each step's text deltas.
"""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve

from serve.engines.base import Chunk, SamplingOptions, TextAssembler, stop_token_ids

CHAT_END_TOKENS = ("<|im_end|>",)  # ChatML turn end: InternLM2 chat models stop here


@dataclass
class HFEngineConfig:
    dtype: str = "float32"  # float32 | bfloat16
    # none | int8_dynamic (torch.ao, default: 1.6-3.8x the fp32 tokens/s at hidden >= 512 on this CPU, slower than
    # fp32 at hidden 128; not batch-invariant, see above) | int8_weight_only (torchao, optional `quant` extra:
    # batch-invariant but no faster than fp32 here). A checkpoint written by jobs/quantize.py carries its own
    # method (coolray_quantization.json) which is applied whatever this says, unless this is "none".
    quantization: str = "int8_dynamic"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01  # how long the first request of a batch waits for company
    num_threads: int = 0  # torch intra-op threads in the replica; 0 = torch's default (Ray sets it to num_cpus)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"serve.hf.dtype must be float32 or bfloat16 on CPU (got {self.dtype!r})")
        if self.quantization not in ("none", "int8_dynamic", "int8_weight_only"):
            raise ValueError(
                f"serve.hf.quantization must be none, int8_dynamic or int8_weight_only (got {self.quantization!r})")
        if self.max_batch_size < 1:
            raise ValueError(f"serve.hf.max_batch_size must be >= 1 (got {self.max_batch_size})")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"serve.hf.batch_wait_timeout_s must be >= 0 (got {self.batch_wait_timeout_s})")


@dataclass(eq=False)
class _Job:
    prompt_ids: list[int]
    options: SamplingOptions
    cancelled: bool = False  # set from the event loop when the client goes away; read by the generate thread


_STEPS_DONE = object()

# Batch invariance: with quantization none (or torchao's int8_weight_only, whose activations stay float) a request's
# logits do not depend on its batch mates, so greedy / seeded answers are the same solo or under load. torch's
# int8_dynamic quantizes activations with one scale per matmul input, i.e. per batch: measured on the trained tiny
# SFT model, logits moved by up to 0.18 and 1 in 8 argmax positions flipped when a second row joined. Serve with
# serve.hf.quantization=none where bit-for-bit reproducibility under load matters more than the 2-3x speed.


class HFEngine:
    def __init__(self, model_path: str, cfg: HFEngineConfig | None = None):
        self.model_path, self.cfg = model_path, cfg or HFEngineConfig()
        self.tokenizer = None
        self.model = None
        self.max_model_len = 0
        self.quantization = "none"
        self._stop_ids: set[int] = set()
        self._batches, self._largest_batch = 0, 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        # One batch queue per engine (decorating the class method would share one queue between instances).
        self._run_batch = serve.batch(
            max_batch_size=self.cfg.max_batch_size, batch_wait_timeout_s=self.cfg.batch_wait_timeout_s
        )(self._batch_steps)

    # ------------------------------------------------------------------------------------------ loading

    def load(self) -> None:
        import torch

        from modeling.loading import load_causal_lm, load_tokenizer, resolve_checkpoint
        from modeling.quantize import quantize_model, read_recipe

        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        local = str(resolve_checkpoint(self.model_path))
        tokenizer = load_tokenizer(local)
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        model = load_causal_lm(local, dtype=self.cfg.dtype).eval()
        recipe = read_recipe(local)
        method = self.cfg.quantization
        if recipe is not None and method != "none":
            method = recipe["method"]
        if method != "none":
            model = quantize_model(model, method)
        self.quantization = method
        self._stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id, CHAT_END_TOKENS)
        self.max_model_len = int(model.config.max_position_embeddings)
        self.tokenizer, self.model = tokenizer, model

    def stats(self) -> dict:
        return {"quantization": self.quantization, "batches": self._batches, "largest_batch": self._largest_batch}

    async def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ serving

    async def stream(self, prompt_ids: list[int], options: SamplingOptions) -> AsyncIterator[Chunk]:
        job = _Job(list(prompt_ids), options)
        try:
            async for chunk in self._run_batch(job):
                if chunk is not None:  # None: a step that only closes other rows
                    yield chunk
        finally:
            job.cancelled = True  # no-op when finished; frees the batch row when the client went away

    async def _batch_steps(self, jobs: list[_Job]):
        """Yields, per decoding step, one entry per job: its Chunk, or StopIteration once it has finished."""
        self._batches += 1
        self._largest_batch = max(self._largest_batch, len(jobs))
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        publish = lambda item: loop.call_soon_threadsafe(steps.put_nowait, item)  # noqa: E731 (thread -> loop)
        done = loop.run_in_executor(self._executor, self._generate, jobs, publish)
        while (item := await steps.get()) is not _STEPS_DONE:
            yield item
        await done  # re-raises a generate() failure into every request of the batch

    def _generate(self, jobs: list[_Job], publish) -> None:
        try:
            for group in fitting_groups(jobs, self.max_model_len):
                self._generate_group(jobs, group, publish)
        finally:
            publish(_STEPS_DONE)

    def _generate_group(self, jobs: list[_Job], group: list[int], publish) -> None:
        """One left-padded `generate` over `jobs[i] for i in group`; each published step still has one entry per
        job of the whole batch (None for the rows of other groups)."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        members = [jobs[i] for i in group]

        def publish_wide(step: list) -> None:
            wide: list = [None] * len(jobs)
            for i, item in zip(group, step):
                wide[i] = item
            publish(wide)

        batch = self.tokenizer.pad({"input_ids": [j.prompt_ids for j in members]}, return_tensors="pt")
        budget = self.max_model_len - batch["input_ids"].shape[1]
        tracker = _RowTracker(members, self.tokenizer, self._stop_ids, publish_wide)
        if budget < 1:
            tracker.finish_all("length")
            return
        config = GenerationConfig(
            max_new_tokens=min(max(j.options.max_tokens for j in members), budget),
            do_sample=False,  # _RowSampler has already drawn each row's token; argmax just reads it
            eos_token_id=sorted(self._stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        with torch.inference_mode():
            self.model.generate(
                **batch,
                generation_config=config,
                logits_processor=LogitsProcessorList([_RowSampler(members)]),
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        tracker.finish_all("length")  # rows cut short by the model's context length


def fitting_groups(jobs: list[_Job], max_model_len: int) -> list[list[int]]:
    """Split a batch into groups that each fit the context when left-padded together: a padded row is as long as
    the group's longest prompt, so a short prompt batched with a long one would otherwise lose the tokens it asked
    for (finish_reason "length" after fewer than max_tokens). One group, in arrival order, when everything fits."""
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].prompt_ids))
    groups: list[list[int]] = []
    longest, most_new = 0, 0
    for i in order:
        n, new = len(jobs[i].prompt_ids), jobs[i].options.max_tokens
        if groups and max(longest, n) + max(most_new, new) <= max_model_len:
            groups[-1].append(i)
            longest, most_new = max(longest, n), max(most_new, new)
        else:
            groups.append([i])
            longest, most_new = n, new
    return [sorted(g) for g in groups]


class _RowSampler:
    """Per-row temperature / nucleus sampling with a per-row seeded generator (rows at temperature 0 stay greedy)."""

    def __init__(self, jobs: list[_Job]):
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.rows = []
        for i, job in enumerate(jobs):
            o = job.options
            if o.temperature == 0:
                continue
            gen = torch.Generator().manual_seed(o.seed if o.seed is not None else secrets.randbits(63))
            warpers = [TemperatureLogitsWarper(o.temperature)]
            if o.top_p < 1.0:
                warpers.append(TopPLogitsWarper(o.top_p))
            self.rows.append((i, warpers, gen))

    def __call__(self, input_ids, scores):
        import torch

        if not self.rows:
            return scores
        out = scores.clone()
        for i, warpers, gen in self.rows:
            row = scores[i: i + 1]
            for warp in warpers:
                row = warp(input_ids[i: i + 1], row)
            token = torch.multinomial(torch.softmax(row, dim=-1), 1, generator=gen)
            out[i] = float("-inf")
            out[i, token] = 0.0
        return out


class _RowTracker:
    """Called by generate after every step with the sequences so far; decides which rows are done."""

    def __init__(self, jobs: list[_Job], tokenizer, stop_ids: set[int], publish):
        self.jobs, self.stop_ids, self.publish = jobs, stop_ids, publish
        self.text = [TextAssembler(tokenizer, j.options.stop) for j in jobs]
        self.ended = [False] * len(jobs)  # final chunk already published

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        newest = input_ids[:, -1].tolist()
        step: list = []
        for i, (job, text) in enumerate(zip(self.jobs, self.text)):
            if self.ended[i]:
                step.append(StopIteration)
                continue
            if job.cancelled:
                text.finish("cancelled")
                self.ended[i] = True
                step.append(StopIteration)
                continue
            delta = text.add(newest[i], newest[i] in self.stop_ids, job.options.max_tokens)
            self.ended[i] = text.finish_reason is not None
            step.append(Chunk(delta, len(text.token_ids), text.finish_reason))
        self._publish_with_close(step)
        return torch.tensor(self.ended, dtype=torch.bool, device=input_ids.device)

    def _publish_with_close(self, step: list) -> None:
        """Publish a step; if it finished rows, follow at once with a step that closes their streams (serve.batch
        ends a caller's stream on StopIteration), so finished requests answer now, not after the next decode."""
        self.publish(step)
        if any(isinstance(item, Chunk) and item.finish_reason for item in step):
            self.publish([StopIteration if ended else None for ended in self.ended])

    def finish_all(self, reason: str) -> None:
        if all(self.ended):
            return
        step: list = []
        for i, text in enumerate(self.text):
            if self.ended[i]:
                step.append(StopIteration)
            else:
                delta = text.finish(reason)
                step.append(Chunk(delta, len(text.token_ids), text.finish_reason))
                self.ended[i] = True
        self._publish_with_close(step)
