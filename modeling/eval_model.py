"""The evaluation model worker: batched generation and token log-likelihoods for any HF causal LM.

Plain Python, no Ray: `cluster/batch_infer.py` hands the class to Ray Data's `map_batches`, which builds one
instance per actor of the pool. A batch holds rows of two kinds (`generate_row`, `nll_row`); the worker answers
each with `response` or `nll_sum` / `n_tokens`.

Engines (ENGINES), chosen per checkpoint in the eval config:
  hf         the checkpoint itself through transformers (`generate` for answers, one forward pass for NLL).
  reference  answers every generation row with its known reference (the world's exact answer, the needle
             sentence): an upper-bound baseline for reports, and a responder whose scores are known in tests.
  constant   answers every row with one fixed text (default ""): the floor baseline.
The two baselines have no likelihoods, so they refuse `nll` rows.
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ENGINES = ("hf", "reference", "constant")


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy decoding
    top_p: float = 1.0
    max_new_tokens: int = 64  # for the domain prompts; the needle suite has its own answer budget
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"generation.temperature must be >= 0, 0 meaning greedy (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generation.top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1 (got {self.max_new_tokens})")


# Every row has every column (Ray Data blocks need one schema); `idx` orders the results, numbered by the caller.
def generate_row(messages: list[dict], max_new_tokens: int, reference: str = "", idx: int = 0) -> dict:
    return {"idx": idx, "kind": "generate", "messages": json.dumps(messages, ensure_ascii=False), "text": "",
            "reference": reference, "max_new_tokens": max_new_tokens}


def nll_row(text: str, idx: int = 0) -> dict:
    return {"idx": idx, "kind": "nll", "messages": "[]", "text": text, "reference": "", "max_new_tokens": 0}


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-templated prompt with an open assistant turn: exactly what the model is asked to continue."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def count_prompt_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids)


def context_limit(model_path: str) -> int:
    """The checkpoint's `max_position_embeddings` (the longest context it was built for)."""
    from transformers import AutoConfig

    from modeling.loading import resolve_checkpoint

    config = AutoConfig.from_pretrained(str(resolve_checkpoint(model_path)))
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        raise ValueError(f"{model_path}/config.json has no max_position_embeddings; set needle.lengths explicitly")
    return int(limit)


class EvalModelWorker:
    """Callable on Ray Data batches (dict of numpy columns) -> idx, response, nll_sum, n_tokens, worker."""

    def __init__(self, model_path: str, engine: str = "hf", dtype: str = "float32", temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, nll_window: int = 512, constant_response: str = ""):
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
        self.engine, self.constant_response = engine, constant_response
        self.temperature, self.top_p, self.nll_window = temperature, top_p, nll_window
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.model = self.tokenizer = None
        self.quantization = "none"  # or the method of a jobs/quantize.py checkpoint's recipe (see _load)
        if engine == "hf":
            self._load(model_path, dtype, seed)

    def _load(self, model_path: str, dtype: str, seed: int) -> None:
        import torch

        from modeling.loading import load_causal_lm, load_tokenizer, resolve_checkpoint
        from modeling.quantize import quantize_model, read_recipe

        torch.manual_seed(seed)
        local = str(resolve_checkpoint(model_path))
        # A checkpoint written by jobs/quantize.py on CPU is the float weights plus a recipe the CPU serving engine
        # applies at load: apply it here too, or the column would score the float model under the quantized name.
        # Its int8 kernels are CPU-only, so such a checkpoint is evaluated on the CPU even where a GPU is present.
        recipe = read_recipe(local)
        self.device = "cuda" if torch.cuda.is_available() and recipe is None else "cpu"
        self.tokenizer = load_tokenizer(local)
        model = load_causal_lm(local, dtype=dtype).eval()
        if recipe is not None:
            model = quantize_model(model, recipe["method"])
        self.quantization = recipe["method"] if recipe is not None else "none"
        self.model = model.to(self.device).eval()
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["idx"])
        responses, nll_sums, n_tokens = [""] * n, [0.0] * n, [0] * n
        by_budget: dict[int, list[int]] = {}
        nll_rows: list[int] = []
        for i, kind in enumerate(batch["kind"]):
            if kind == "generate":
                by_budget.setdefault(int(batch["max_new_tokens"][i]), []).append(i)
            elif kind == "nll":
                nll_rows.append(i)
            else:
                raise ValueError(f"row {batch['idx'][i]}: unknown kind {kind!r} (expected 'generate' or 'nll')")
        for budget, rows in by_budget.items():
            answers = self.respond([json.loads(batch["messages"][i]) for i in rows],
                                   [str(batch["reference"][i]) for i in rows], budget)
            for i, a in zip(rows, answers):
                responses[i] = a
        if nll_rows:
            for i, (s, t) in zip(nll_rows, self.nll([str(batch["text"][i]) for i in nll_rows])):
                nll_sums[i], n_tokens[i] = s, t
        return {
            "idx": np.asarray(batch["idx"], dtype=np.int64),
            "response": np.asarray(responses, dtype=object),
            "nll_sum": np.asarray(nll_sums, dtype=np.float64),
            "n_tokens": np.asarray(n_tokens, dtype=np.int64),
            "worker": np.asarray([self.worker_id] * n, dtype=object),
        }

    # ------------------------------------------------------------------------------------------ generation

    def respond(self, conversations: list[list[dict]], references: list[str], max_new_tokens: int) -> list[str]:
        if self.engine == "reference":
            return list(references)
        if self.engine == "constant":
            return [self.constant_response] * len(conversations)
        return self._generate(conversations, max_new_tokens)

    def _generate(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"  # generation continues from the right edge of every row
        prompts = [render_prompt(tok, m) for m in conversations]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        room = self.max_positions - prompt_len
        if room < 1:
            raise ValueError(f"a prompt of {prompt_len} tokens leaves no room to answer within the model's "
                             f"{self.max_positions}-token context; shorten the eval prompts (e.g. needle.lengths)")
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} if self.temperature > 0 \
            else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=min(max_new_tokens, room),
                                      pad_token_id=tok.pad_token_id, **sampling)
        return [tok.decode(row, skip_special_tokens=True).strip() for row in out[:, prompt_len:]]

    # ------------------------------------------------------------------------------------------ likelihood

    def _windows(self, text: str) -> list[list[int]]:
        """Non-overlapping windows of at most `nll_window` tokens; each starts with BOS (when the tokenizer has
        one) so that every token of the text is predicted exactly once."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        bos = self.tokenizer.bos_token_id
        window = min(self.nll_window, self.max_positions)
        step = window - 1 if bos is not None else window
        return [([bos] if bos is not None else []) + ids[s:s + step] for s in range(0, len(ids), step)]

    def nll(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(sum of token negative log-likelihoods, number of predicted tokens) per text."""
        if self.engine != "hf":
            raise ValueError(f"engine {self.engine!r} has no likelihoods; perplexity needs engine 'hf'")
        import torch
        import torch.nn.functional as F

        owners, windows = [], []
        for k, text in enumerate(texts):
            for w in self._windows(text):
                if len(w) >= 2:
                    owners.append(k)
                    windows.append(w)
        totals = [[0.0, 0] for _ in texts]
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(windows), 8):
            chunk = windows[start:start + 8]
            ids = torch.full((len(chunk), max(len(w) for w in chunk)), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, w in enumerate(chunk):
                ids[r, : len(w)] = torch.tensor(w)
                mask[r, : len(w)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            # NLL_t = -log p(x_t | x_<t); padded targets are masked out.
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            token_nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
            for r in range(len(chunk)):
                owner = owners[start + r]
                totals[owner][0] += float(token_nll[r].sum())
                totals[owner][1] += int((targets[r] != -100).sum())
        return [(s, n) for s, n in totals]
