"""Gradients do not depend on how a mini-batch is split into micro-batches or data-parallel ranks.

A tiny policy (linear layer to logits) and critic (linear layer to values) are trained on a ragged batch of 8
responses plus 4 pretraining rows. The gradient of policy + value + PTX loss is computed three ways:
(a) the whole batch at once, (b) 4 uneven micro-batches accumulated, (c) 2 simulated DP ranks with 2 micro-batches
each, gradients summed over ranks (what DDP's all-reduce gives after the loss is scaled by the world size).
With the global denominator they must agree; the common mistake (each micro-batch uses its own mean) must not.
"""
from __future__ import annotations

import pytest
import torch

from algo.masked import compute_aggregation_denominator, compute_logprobs_from_logits
from algo.ppo import PPOLossConfig, compute_policy_loss, compute_ptx_loss, compute_value_loss

B, T, F, V = 8, 6, 5, 7
LENGTHS = [6, 1, 3, 5, 2, 6, 4, 1]  # ragged responses, right padded
PTX_LENGTHS = [6, 2, 4, 3]
# uneven micro-batches, so per-micro-batch means and the global mean really differ
MICRO = [(0, 3), (3, 4), (4, 6), (6, 8)]
PTX_MICRO = [(0, 1), (1, 2), (2, 3), (3, 4)]
RANKS = [[0, 1], [2, 3]]  # rank r runs these micro-batch indices


def _mask(lengths, width):
    return (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    dt = torch.float64
    return {
        "features": torch.randn(B, T, F, generator=gen, dtype=dt),
        "tokens": torch.randint(0, V, (B, T), generator=gen),
        "old_logprobs": -torch.rand(B, T, generator=gen, dtype=dt) * 2 - 0.5,
        "advantages": torch.randn(B, T, generator=gen, dtype=dt),
        "returns": torch.randn(B, T, generator=gen, dtype=dt),
        "old_values": torch.randn(B, T, generator=gen, dtype=dt),
        "response_mask": _mask(LENGTHS, T),
        "ptx_features": torch.randn(4, T, F, generator=gen, dtype=dt),
        "ptx_tokens": torch.randint(0, V, (4, T), generator=gen),
        "ptx_mask": _mask(PTX_LENGTHS, T),
    }


def _fresh_model() -> torch.nn.ModuleDict:
    torch.manual_seed(1)
    return torch.nn.ModuleDict({"policy": torch.nn.Linear(F, V), "critic": torch.nn.Linear(F, 1)}).double()


def _loss(model, batch, rows, ptx_rows, cfg, denom, ptx_denom):
    sl, psl = slice(*rows), slice(*ptx_rows)
    mask = batch["response_mask"][sl]
    logprobs = compute_logprobs_from_logits(model["policy"](batch["features"][sl]), batch["tokens"][sl])
    values = model["critic"](batch["features"][sl]).squeeze(-1)
    pg, _ = compute_policy_loss(logprobs, batch["old_logprobs"][sl], batch["advantages"][sl], mask, cfg, denom)
    vf, _ = compute_value_loss(values, batch["returns"][sl], mask, cfg, batch["old_values"][sl], denom)
    ptx_logprobs = compute_logprobs_from_logits(model["policy"](batch["ptx_features"][psl]), batch["ptx_tokens"][psl])
    ptx, _ = compute_ptx_loss(ptx_logprobs, batch["ptx_mask"][psl], cfg, ptx_denom)
    return pg + vf + ptx


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _global_denominators(batch, cfg, micro_ids):
    # each micro-batch's local count, summed (on a cluster: summed over micro-batches, then all-reduced over ranks)
    denom = sum(compute_aggregation_denominator(batch["response_mask"][slice(*MICRO[i])], cfg.aggregation)
                for i in micro_ids)
    ptx_denom = sum(compute_aggregation_denominator(batch["ptx_mask"][slice(*PTX_MICRO[i])], "token-mean")
                    for i in micro_ids)
    return denom, ptx_denom


# value clipping on, so the clipped branch is covered too
CONFIGS = [PPOLossConfig(value_clip=0.3), PPOLossConfig(value_clip=0.3, aggregation="seq-mean-token-mean")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.aggregation)
def test_full_batch_micro_batches_and_dp_ranks_give_the_same_gradient(batch, cfg):
    full = _fresh_model()
    full_loss = _loss(full, batch, (0, B), (0, 4), cfg, None, None)
    full_loss.backward()
    want = _grads(full)

    denom, ptx_denom = _global_denominators(batch, cfg, range(len(MICRO)))
    accumulated = _fresh_model()
    summed_loss = 0.0
    for rows, ptx_rows in zip(MICRO, PTX_MICRO):
        loss = _loss(accumulated, batch, rows, ptx_rows, cfg, denom, ptx_denom)
        loss.backward()
        summed_loss += loss.item()
    assert summed_loss == pytest.approx(full_loss.item(), rel=1e-12)
    torch.testing.assert_close(_grads(accumulated), want, rtol=1e-10, atol=1e-12)

    rank_grads = []
    for micro_ids in RANKS:
        replica = _fresh_model()
        for i in micro_ids:
            _loss(replica, batch, MICRO[i], PTX_MICRO[i], cfg, denom, ptx_denom).backward()
        rank_grads.append(_grads(replica))
    torch.testing.assert_close(sum(rank_grads), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.aggregation)
def test_per_micro_batch_means_do_not_reproduce_the_full_batch(batch, cfg):
    """Negative control: averaging micro-batch means weights tokens unevenly with ragged lengths."""
    full = _fresh_model()
    _loss(full, batch, (0, B), (0, 4), cfg, None, None).backward()
    naive = _fresh_model()
    for rows, ptx_rows in zip(MICRO, PTX_MICRO):
        (_loss(naive, batch, rows, ptx_rows, cfg, None, None) / len(MICRO)).backward()
    assert not torch.allclose(_grads(naive), _grads(full), rtol=1e-3, atol=1e-6)


def test_global_denominators_count_the_whole_mini_batch(batch):
    denom, ptx_denom = _global_denominators(batch, PPOLossConfig(), range(len(MICRO)))
    assert denom.item() == sum(LENGTHS) and ptx_denom.item() == sum(PTX_LENGTHS)
    seqs, _ = _global_denominators(batch, PPOLossConfig(aggregation="seq-mean-token-mean"), range(len(MICRO)))
    assert seqs.item() == B
