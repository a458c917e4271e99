"""The RLHF worker classes, driven directly in this process with the tiny model (no Ray)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from actors.batch import build_lm_batch, build_sequence_batch, split_rows
from actors.critic import CriticConfig, CriticWorker
from actors.policy import PolicyConfig, PolicyWorker, merge_rank_metrics
from actors.reference import ReferenceConfig, ReferenceWorker
from actors.rollout import SamplingConfig
from algo.masked import compute_aggregation_denominator
from algo.ppo import PPOLossConfig

# Two rows of different prompt and response lengths, so left/right padding and position ids are exercised.
PROMPTS = [[5, 17, 42, 8, 99, 23], [7, 64, 12]]
RESPONSES = [[31, 77, 3], [90, 14, 55, 61, 20]]


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    """A tiny conditional RM: the tiny model's backbone plus a random (normal-initialised) reward head."""
    from modeling.reward import RewardModel, RewardModelConfig

    model, tok = RewardModel.from_causal_lm(str(tiny_dir), RewardModelConfig(), seed=3)
    return str(model.save_pretrained(tmp_path_factory.mktemp("rm") / "model", tok))


def _policy(tiny_dir, micro_batch_size=2, micro_per_step=1, lr=1e-3, sampling=None):
    cfg = PolicyConfig(path=str(tiny_dir))
    cfg.trainer = dataclasses.replace(cfg.trainer, lr=lr, micro_batch_size=micro_batch_size)
    return PolicyWorker(cfg, PPOLossConfig(), sampling=sampling, micro_per_step=micro_per_step, total_steps=10)


def _manual_logprobs(model, prompt, response):
    """Unpadded forward of prompt + response; log softmax at position t predicts token t + 1."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    first = len(prompt)
    return torch.stack([logp[first - 1 + t, tok] for t, tok in enumerate(response)]), logits[first - 1 : first - 1 + len(response)]


def _batch():
    return build_sequence_batch(PROMPTS, RESPONSES, pad_id=3)


def test_policy_logprobs_equal_a_manual_unpadded_forward(tiny_dir):
    policy = _policy(tiny_dir, sampling=SamplingConfig(temperature=1.0, top_p=0.9))
    out = policy.compute_logprobs(_batch())
    mask = _batch()["response_mask"]
    assert out["logprobs"].shape == mask.shape == (2, 5)
    for row, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        expected, logits = _manual_logprobs(policy.engine.module, prompt, response)
        n = len(response)
        torch.testing.assert_close(out["logprobs"][row, :n], expected, atol=1e-5, rtol=1e-5)
        # entropy H = -sum p log p of the same next-token distributions
        p = torch.softmax(logits, dim=-1)
        torch.testing.assert_close(out["entropy"][row, :n], -(p * p.log()).sum(-1), atol=1e-4, rtol=1e-4)
        # top-p 0.9 renormalises over the nucleus: a kept token's processed log-prob is >= its raw one, a dropped
        # token's is -inf (the engine can never sample it)
        processed = out["processed_logprobs"][row, :n]
        kept = torch.isfinite(processed)
        assert bool((processed[kept] >= expected[kept] - 1e-6).all()) and bool(kept.any())


def test_reference_equals_policy_at_init(tiny_dir):
    policy = _policy(tiny_dir)
    reference = ReferenceWorker(ReferenceConfig(path=str(tiny_dir), forward_batch_size=1))
    torch.testing.assert_close(reference.compute_logprobs(_batch())["logprobs"],
                               policy.compute_logprobs(_batch())["logprobs"], atol=1e-5, rtol=1e-5)


def test_critic_starts_from_rm_backbone_with_a_fresh_head(rm_dir):
    from modeling.reward import RewardModel

    rm = RewardModel.from_pretrained(rm_dir)
    critic = CriticWorker(CriticConfig(path=rm_dir), PPOLossConfig())
    value_model = critic.engine.module
    rm_backbone = rm.backbone.state_dict()
    for name, tensor in value_model.backbone.state_dict().items():
        torch.testing.assert_close(tensor, rm_backbone[name], atol=0, rtol=0)
    assert rm.head.weight.abs().sum() > 0, "the RM head is random, so a copied head would be non-zero"
    assert torch.count_nonzero(critic.value_head_weight()) == 0
    values = critic.compute_values(_batch())["values"]
    assert values.shape == (2, 5) and torch.count_nonzero(values) == 0  # zero head -> V = 0 everywhere


def _ppo_fields(batch, policy, advantage=1.0):
    old = policy.compute_logprobs(batch)["logprobs"]
    mask = batch["response_mask"]
    return {**batch, "old_logprobs": old, "advantages": advantage * mask,
            "denominator": compute_aggregation_denominator(mask, "token-mean")}


def test_policy_train_step_raises_logprobs_of_positive_advantage_tokens(tiny_dir):
    policy = _policy(tiny_dir, micro_batch_size=2, lr=1e-3)
    batch = _ppo_fields(_batch(), policy, advantage=1.0)
    before = policy.weight_checksum()
    metrics = merge_rank_metrics([policy.train_step(batch)])
    # At the first step rho = 1 everywhere: L_t = max(-A, -clip(1) A) = -A = -1, token mean over 8 tokens = -1;
    # nothing is clipped yet.
    assert metrics["policy/loss"] == pytest.approx(-1.0, abs=1e-6)
    assert metrics["policy/clipfrac"] == 0.0
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["policy/grad_norm"] > 0 and metrics["policy/lr"] == pytest.approx(1e-3)
    assert policy.weight_checksum() != before
    after = policy.compute_logprobs(_batch())["logprobs"]
    mask = batch["response_mask"].bool()
    assert (after[mask] - batch["old_logprobs"][mask]).mean() > 0


def test_ptx_loss_is_added_with_its_coefficient(tiny_dir):
    policy = _policy(tiny_dir, micro_batch_size=2, lr=1e-3)
    batch = _ppo_fields(_batch(), policy, advantage=0.0)
    sequences = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [10, 11, 12]]  # longer than the rollout rows, and shorter
    ptx = build_lm_batch(sequences, pad_id=3)
    ptx["denominator"] = ptx["loss_mask"].to(torch.float64).sum()
    # Expected LM loss from separate, unpadded forwards: mean NLL over the 9 + 2 predicted tokens.
    nll = []
    for seq in sequences:
        with torch.no_grad():
            logp = torch.log_softmax(policy.engine.module(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        nll += [-logp[i, tok].item() for i, tok in enumerate(seq[1:])]
    metrics = merge_rank_metrics([policy.train_step(batch, ptx)])
    # With A = 0 the PPO term is 0; the PTX term is 0.5 * mean NLL (stacked with the rollout rows in one forward).
    assert metrics["policy/loss"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["ptx/lm_loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert metrics["ptx/loss"] == pytest.approx(0.5 * sum(nll) / len(nll), rel=1e-5)


def _recording_grads(worker) -> dict[str, torch.Tensor]:
    """Make `worker` copy its gradients just before each optimiser step (what the update is computed from)."""
    grads: dict[str, torch.Tensor] = {}
    step = worker.engine.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in worker.engine.module.named_parameters()})
        return step(*args, **kwargs)

    worker.engine.optimizer.step = recording_step
    return grads


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_micro_batching_and_rank_split_do_not_change_the_gradient(tiny_dir):
    """Token-mean with a global denominator: 1 micro-batch of 4 rows, 2 micro-batches of 2 rows, and 2 "ranks" of
    2 rows (whose gradients DDP would combine) all give the full-batch gradient."""
    prompts, responses = PROMPTS * 2, [RESPONSES[0], RESPONSES[1], RESPONSES[1][:2], RESPONSES[0] + [5, 6]]
    batch = build_sequence_batch(prompts, responses, pad_id=3)

    def worker(micro_batch_size, micro_per_step):
        w = _policy(tiny_dir, micro_batch_size=micro_batch_size, micro_per_step=micro_per_step, lr=1e-3)
        w.engine.cfg.grad_clip = 0.0  # compare raw gradients (clipping would rescale the per-rank halves)
        return w, _recording_grads(w)

    (whole, g_whole), (split, g_split) = worker(4, 1), worker(2, 2)
    advantages = torch.linspace(-1, 1, batch["response_mask"].numel()).view_as(batch["response_mask"])
    fields = {**_ppo_fields(batch, whole), "advantages": advantages * batch["response_mask"]}
    m_whole = merge_rank_metrics([whole.train_step(fields)])
    m_split = merge_rank_metrics([split.train_step(fields)])
    assert m_whole["policy/loss"] == pytest.approx(m_split["policy/loss"], abs=1e-6)
    ranks = [worker(2, 1) for _ in range(2)]
    per_rank = [w.train_step(shard) for (w, _), shard in zip(ranks, split_rows(fields, 2))]
    assert merge_rank_metrics(per_rank)["policy/loss"] == pytest.approx(m_whole["policy/loss"], abs=1e-6)
    for name, grad in g_whole.items():
        torch.testing.assert_close(g_split[name], grad, atol=1e-7, rtol=1e-4, msg=name)
        # Each rank multiplies by world size (1 here); DDP would average the two, i.e. sum / 2 * 2 = sum.
        torch.testing.assert_close(ranks[0][1][name] + ranks[1][1][name], grad, atol=1e-7, rtol=1e-4, msg=name)


def test_critic_step_regresses_values_towards_returns(rm_dir):
    cfg = CriticConfig(path=rm_dir)
    cfg.trainer = dataclasses.replace(cfg.trainer, lr=1e-2, micro_batch_size=2)
    critic = CriticWorker(cfg, PPOLossConfig())
    batch = _batch()
    mask = batch["response_mask"]
    fields = {**batch, "returns": mask.clone(), "values": torch.zeros_like(mask),
              "denominator": compute_aggregation_denominator(mask, "token-mean")}
    metrics = merge_rank_metrics([critic.train_step(fields)])
    # V = 0, R = 1 on every response token: 1/2 (V - R)^2 = 0.5, token mean 0.5.
    assert metrics["critic/value_loss"] == pytest.approx(0.5, abs=1e-6)
    assert torch.count_nonzero(critic.value_head_weight()) > 0
    second = merge_rank_metrics([critic.train_step(fields)])
    assert second["critic/value_loss"] < 0.5


def test_save_load_restores_weights_and_optimizer(tiny_dir, tmp_path):
    policy = _policy(tiny_dir, lr=1e-3)
    batch = _ppo_fields(_batch(), policy)
    policy.train_step(batch)
    policy.save(str(tmp_path / "ckpt"))
    saved = policy.weight_checksum()
    policy.train_step(batch)
    after_second = policy.weight_checksum()
    assert after_second != saved
    policy.load(str(tmp_path / "ckpt"))
    assert policy.weight_checksum() == saved
    policy.train_step(batch)  # Adam moments came back too: the replayed step lands on the same weights
    assert policy.weight_checksum() == pytest.approx(after_second, abs=1e-9)


def test_exported_snapshot_is_what_the_next_sync_serves(tiny_dir, tmp_path):
    policy = _policy(tiny_dir, lr=1e-3)
    live_before = {k: v.clone() for k, v in policy.sync_state_dict().items()}
    policy.export_hf(str(tmp_path / "early"))
    assert (tmp_path / "early" / "tokenizer.json").exists() and (tmp_path / "early" / "config.json").exists()
    policy.train_step(_ppo_fields(_batch(), policy))
    policy.use_sync_snapshot(str(tmp_path / "early"))
    snapshot = policy.sync_state_dict()
    assert set(snapshot) == set(live_before)
    for name, tensor in live_before.items():
        torch.testing.assert_close(snapshot[name], tensor, atol=0, rtol=0)
    policy.use_sync_snapshot(None)
    changed = policy.sync_state_dict()
    assert any(not torch.equal(changed[k], live_before[k]) for k in live_before)


def test_exported_critic_loads_back_as_a_value_model(rm_dir, tmp_path):
    from modeling.value import ValueModel

    cfg = CriticConfig(path=rm_dir)
    cfg.trainer = dataclasses.replace(cfg.trainer, lr=1e-2, micro_batch_size=2)
    critic = CriticWorker(cfg, PPOLossConfig())
    mask = _batch()["response_mask"]
    critic.train_step({**_batch(), "returns": mask.clone(), "values": torch.zeros_like(mask),
                       "denominator": compute_aggregation_denominator(mask, "token-mean")})
    critic.export_hf(str(tmp_path / "critic"))
    loaded = ValueModel.from_pretrained(str(tmp_path / "critic"))
    torch.testing.assert_close(loaded.value_head.weight, critic.value_head_weight(), atol=0, rtol=0)
    batch = _batch()
    with torch.no_grad():
        values = loaded(batch["input_ids"], batch["attention_mask"], batch["position_ids"])[:, 5:10]
    torch.testing.assert_close(values, critic.compute_values(batch)["values"], atol=1e-5, rtol=1e-5)
