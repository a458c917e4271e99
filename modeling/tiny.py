"""The embedded default model: a tiny decoder with the InternLM2 shape, and a locally trained BPE tokenizer.

InternLM2's block is LLaMA's (pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied
embeddings), so the HF `LlamaForCausalLM` class is the faithful and vLLM-loadable carrier. The fused
interleaved Wqkv of InternLM2 is a storage layout: HF Llama keeps q/k/v separate and vLLM fuses them itself.
head_dim is kept at 32 because vLLM's CPU attention rejects 16.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# ChatML (InternLM2 chat format, spec 2.2) plus a reward token appended for the reward model (spec 7.1).
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
REWARD_TOKEN = "<|reward|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, IM_END, REWARD_TOKEN]

# Renders system/user/assistant/environment turns; `add_generation_prompt` opens an assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TinyModelSpec:
    hidden_size: int = 128
    intermediate_size: int = 352  # ~ 8/3 * hidden rounded up to a multiple of 32 (SwiGLU)
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA: 2 query heads per KV head
    max_position_embeddings: int = 1024
    rope_theta: float = 1_000_000.0  # InternLM2's final RoPE base
    rms_norm_eps: float = 1e-5
    vocab_size: int = 2048  # tokenizer target size; the model takes the tokenizer's real size

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("model.tiny.hidden_size must be divisible by model.tiny.num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("model.tiny.num_attention_heads must be a multiple of model.tiny.num_key_value_heads")
        if self.hidden_size // self.num_attention_heads < 32:
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads} "
                "is below 32; vLLM's CPU attention rejects it. Raise model.tiny.hidden_size or lower the head count."
            )


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """Train a byte-level BPE on `texts`; returns a transformers fast tokenizer with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END, REWARD_TOKEN],
    )
    fast.chat_template = CHATML_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(spec: TinyModelSpec, tokenizer, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized by `spec` and matched to `tokenizer`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def save_pretrained(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model + tokenizer as one HF directory, atomically (readers never see a half-written model)."""
    from data.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)
