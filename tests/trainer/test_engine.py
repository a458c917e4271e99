"""The per-rank engine in one process: schedule, accumulation, grad norm, LoRA, checkpoint/resume equivalence."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import LoraConfig, TrainerConfig
from trainer.engine import build_engine, build_optimizer_and_schedule, param_groups
from trainer.lm_tasks import PretrainTask
from trainer.loop import seed_all, train


def _task(packed_corpus, tiny_dir, mbs=8):
    return PretrainTask(data_dir=str(packed_corpus), tokenizer_path=str(tiny_dir), micro_batch_size=mbs, seed=0)


def _cfg(**kw):
    base = dict(num_workers=1, lr=1e-2, warmup_ratio=0.0, max_steps=6, micro_batch_size=8, checkpoint_every=2)
    base.update(kw)
    return TrainerConfig(**base)


def test_config_rejects_bad_values_with_the_fix():
    with pytest.raises(ValueError, match="trainer.backend must be one of ddp, deepspeed"):
        TrainerConfig(backend="fsdp")
    with pytest.raises(ValueError, match="QLoRA needs a CUDA GPU and bitsandbytes|needs a CUDA GPU and bitsandbytes"):
        TrainerConfig(lora=LoraConfig(enabled=True, qlora=True))
    with pytest.raises(ValueError, match="trainer.betas"):
        TrainerConfig(betas=[0.9])
    with pytest.raises(ValueError, match="max_steps > 0 or trainer.epochs > 0"):
        TrainerConfig(max_steps=0, epochs=0)


def test_schedule_is_linear_warmup_then_cosine_to_min_ratio():
    # lr=1, T=10, warmup_ratio=0.2 -> w = ceil(0.2 * 10) = 2, min ratio m = 0.1:
    #   t=0: 0/2 = 0;  t=1: 1/2 = 0.5;  t=2: progress 0 -> m + (1-m) * 0.5 * (1 + cos 0) = 1.0
    #   t=6: progress (6-2)/(10-2) = 0.5 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    #   t=10: progress 1 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi)) = 0.1
    cfg = TrainerConfig(lr=1.0, warmup_ratio=0.2, min_lr_ratio=0.1, max_steps=10)
    opt, sched = build_optimizer_and_schedule(torch.nn.Linear(2, 2), cfg, total_steps=10)
    lrs = []
    for _ in range(11):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.55) and lrs[10] == pytest.approx(0.1)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_weight_decay_only_on_matrices():
    groups = param_groups(torch.nn.Linear(3, 2), weight_decay=0.1)
    assert [(g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in groups] == [(0.1, [(2, 3)]), (0.0, [(2,)])]


def _one_step(task, cfg):
    seed_all(0)
    engine = build_engine(task.build_model(), cfg, total_steps=1)
    for batch in task.batches(0, 1, 0):
        out = engine.step(task.loss(engine.model, batch)[0])
        if out.stepped:
            return engine, out


def test_accumulating_two_half_batches_equals_one_full_batch(packed_corpus, tiny_dir):
    # Rows all have 32 tokens, so the mean loss of 8 rows = mean of the means of rows 0-3 and 4-7; the same
    # gradient gives the same AdamW step and the same global grad norm.
    full, out_full = _one_step(_task(packed_corpus, tiny_dir, 8), _cfg(micro_batch_size=8, grad_accum=1))
    acc, out_acc = _one_step(_task(packed_corpus, tiny_dir, 4), _cfg(micro_batch_size=4, grad_accum=2))
    assert acc.global_step == full.global_step == 1 and acc.micro_steps == 2
    assert out_acc.grad_norm == pytest.approx(out_full.grad_norm, rel=1e-4)
    # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, the order in which two half-batches are summed
    # moves an element's update by a fraction of lr (up to 4e-5 of the 1e-2 step on one CPU, 3 elements in 45,056),
    # so weights agree to 1 % of a step; a wrong accumulation flips or halves whole steps (and the grad norm above).
    for (name, a), b in zip(acc.module.state_dict().items(), full.module.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_reported_grad_norm_is_the_global_norm_before_clipping(packed_corpus, tiny_dir):
    task = _task(packed_corpus, tiny_dir)
    batch = next(iter(task.batches(0, 1, 0)))
    seed_all(0)
    ref = task.build_model()
    task.loss(ref, batch)[0].backward()
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ref.parameters()))
    _, out = _one_step(task, _cfg(grad_clip=1e-3))  # clipping far below the norm: the norm reported is pre-clip
    assert expected > 1e-3 and out.grad_norm == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_lora_trains_only_adapters_and_exports_merged(packed_corpus, tiny_dir, backend):
    """ddp exports by copying the peft model; ZeRO-3 rebuilds the base from the factory and loads the adapters."""
    task = _task(packed_corpus, tiny_dir)
    cfg = _cfg(backend=backend, zero_stage=3, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    seed_all(0)
    model = task.build_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, cfg, total_steps=3, model_factory=task.build_export_model)
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batches = list(task.batches(0, 1, 0))[:3]
    for batch in batches:
        engine.step(task.loss(engine.model, batch)[0])
    merged = engine.full_model()
    assert not any("lora" in k for k in merged.state_dict())
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only the adapted layers moved
    ids = batches[0]["input_ids"][:2]
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        live_logits = engine.module(input_ids=ids).logits  # ZeRO-3's hooks gather the shards for the forward
    torch.testing.assert_close(merged_logits, live_logits.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,zero_stage,bf16", [("ddp", 2, False), ("deepspeed", 3, True)])
def test_resume_after_a_crash_continues_exactly(packed_corpus, tiny_dir, tmp_path, backend, zero_stage, bf16):
    """6 steps straight == 3 steps, crash (no checkpoint at 3), rerun from the step-2 checkpoint to 6."""
    # 64 rows / 8 = 8 micro-batches per epoch = 4 steps of 2: the run crosses into epoch 1, the crash is mid-epoch.
    task = _task(packed_corpus, tiny_dir, mbs=8)
    cfg = dict(backend=backend, zero_stage=zero_stage, bf16=bf16, micro_batch_size=8, grad_accum=2, warmup_ratio=0.3)

    straight_rows: list[dict] = []
    straight = train(task, _cfg(**cfg), tmp_path / "straight", on_metrics=straight_rows.append)

    resumed_rows: list[dict] = []
    first = train(task, _cfg(stop_after_steps=3, **cfg), tmp_path / "resumed", on_metrics=resumed_rows.append)
    assert first.stopped_early and first.model_dir is None and first.steps == 3
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step_00000002"]
    second = train(task, _cfg(**cfg), tmp_path / "resumed", on_metrics=resumed_rows.append)
    assert second.resumed_from_step == 2 and second.steps == 6

    def losses(rows):  # later rows of a step win: the rerun's step 3 replaces the crashed run's
        return {r["step"]: [r["loss"], r["lr"], r["grad_norm"]] for r in rows if "step" in r}

    got, want = losses(resumed_rows), losses(straight_rows)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]  # keep_checkpoints=2, temp dirs gone
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["epoch"] == 1 and meta["micro_batch"] == 4
    assert straight.final_loss == pytest.approx(second.final_loss)
    if bf16:  # the export carries DeepSpeed's fp32 master weights, not the bf16 working copy
        assert any(not torch.equal(v, v.bfloat16().float()) for v in a.values())
