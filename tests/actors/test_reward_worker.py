"""The reward model directory format and the RewardWorker that scores (domain, conversation, response) items."""
from __future__ import annotations

import json

import pytest
import torch

from data.world import make_prompts, respond
from modeling.reward import CONFIG_FILE, HEAD_FILE, RewardModel, RewardModelConfig, UnknownDomainError, load_reward_model
from modeling.tiny import REWARD_TOKEN


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    cfg = RewardModelConfig(domains={"default": "", "helpful": "Rate helpfulness.", "math": "Rate the math.",
                                     "poetry": "Rate the poem."})
    model, tok = RewardModel.from_causal_lm(str(tiny_dir), cfg, seed=5)
    return model.save_pretrained(tmp_path_factory.mktemp("rm") / "model", tok)


def _items(n: int = 6) -> list[dict]:
    prompts = make_prompts("math", n, seed=0)
    return [{"domain": "math", "messages": p.messages, "response": respond(p, "equation" if i % 2 else "unsure")}
            for i, p in enumerate(prompts)]


def test_saved_directory_is_self_describing_and_reloads_identically(rm_dir, tiny_dir):
    meta = json.loads((rm_dir / CONFIG_FILE).read_text())
    assert meta["domains"]["poetry"] == "Rate the poem." and meta["reward_token"] == REWARD_TOKEN
    assert (rm_dir / HEAD_FILE).exists() and (rm_dir / "config.json").exists() and (rm_dir / "tokenizer.json").exists()
    model, encoder = load_reward_model(rm_dir)
    again = RewardModel.from_pretrained(rm_dir)
    batch = encoder.collate([encoder.encode("math", [{"role": "user", "content": "What is 2 + 3?"}], "2 + 3 = 5.")])
    assert batch["input_ids"][0, -1].item() == encoder.reward_id  # the head reads the appended reward token
    with torch.no_grad():
        assert model(**batch).item() == again(**batch).item()
    # the backbone starts as the SFT checkpoint's (here the tiny model), minus its LM head
    from modeling.loading import load_causal_lm

    lm = load_causal_lm(str(tiny_dir))
    torch.testing.assert_close(model.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_load_switches_to_the_new_rm_in_place_and_a_bad_directory_keeps_the_old(rm_dir, tiny_dir, tmp_path):
    from actors.reward import RewardWorker

    other_cfg = RewardModelConfig(domains={"default": "", "math": "Check every step."})
    other, tok = RewardModel.from_causal_lm(str(tiny_dir), other_cfg, seed=11)
    other_dir = other.save_pretrained(tmp_path / "next", tok)
    items = _items(4)
    worker = RewardWorker(str(rm_dir))
    before = worker.score(items)
    assert worker.load(str(other_dir)) == str(other_dir) and worker.model_dir == str(other_dir)
    assert worker.score(items) == pytest.approx(RewardWorker(str(other_dir)).score(items), abs=1e-6)
    assert worker.score(items) != pytest.approx(before, abs=1e-4)  # another head and another domain prompt
    assert worker.domains == ["default", "math"]
    with pytest.raises(Exception):
        worker.load(str(tmp_path / "missing"))
    assert worker.model_dir == str(other_dir) and worker.score(items) == pytest.approx(
        RewardWorker(str(other_dir)).score(items), abs=1e-6)


def test_the_domain_prompt_is_prepended_only_for_the_rm_and_unknown_domains_list_the_known(rm_dir):
    _, encoder = load_reward_model(rm_dir)
    msgs = encoder.messages("poetry", [{"role": "user", "content": "A poem?"}], "Roses.")
    assert msgs[0] == {"role": "system", "content": "Rate the poem."} and msgs[-1]["role"] == "assistant"
    assert encoder.messages("default", [{"role": "user", "content": "A poem?"}], "Roses.")[0]["role"] == "user"
    with pytest.raises(UnknownDomainError, match="known domains: default, helpful, math, poetry"):
        encoder.encode("cooking", [{"role": "user", "content": "x"}], "y")


def test_worker_scores_in_input_order_independent_of_batching(rm_dir):
    from actors.reward import RewardWorker

    items = _items(7)
    batched = RewardWorker(str(rm_dir), batch_size=3).score(items)
    one_by_one = [RewardWorker(str(rm_dir), batch_size=1).score([it])[0] for it in items]
    assert len(batched) == 7 and batched == pytest.approx(one_by_one, abs=1e-5)
    assert all(-5 < s < 5 for s in batched)
    assert len(set(round(s, 6) for s in batched)) > 1


def test_the_condition_changes_the_score_of_the_same_reply(rm_dir):
    from actors.reward import RewardWorker

    worker = RewardWorker(str(rm_dir))
    item = _items(1)[0]
    scores = worker.score([{**item, "domain": d} for d in ("math", "helpful", "default")])
    assert len({round(s, 6) for s in scores}) == 3  # three different system prompts (one empty), three scores


def test_worker_rejects_bad_items_and_clamps_to_the_barrier_interval(rm_dir):
    from actors.reward import ItemError, RewardWorker

    worker = RewardWorker(str(rm_dir))
    with pytest.raises(ItemError, match=r"items\[1\].response"):
        worker.score([_items(1)[0], {"domain": "math", "messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ItemError, match=r"items\[0\].messages\[0\]"):
        worker.score([{"domain": "math", "messages": [{"content": "q"}], "response": "r"}])
    with pytest.raises(UnknownDomainError, match="cooking"):
        worker.score([{**_items(1)[0], "domain": "cooking"}])
    with torch.no_grad():
        worker.model.head.weight.mul_(1e4)  # push raw scores far outside (-5, 5)
    raw = worker.score(_items(4), clamp=False)
    assert max(abs(s) for s in raw) > 5
    assert all(-5 < s < 5 for s in worker.score(_items(4)))


def test_a_tokenizer_without_the_reward_token_gets_it_added_and_the_embeddings_grow():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modeling.reward import RewardEncoder
    from modeling.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, TinyModelSpec, build_tiny_model

    # a user's own tokenizer: ChatML-capable, but no <|reward|>
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["What is 2 + 3? 2 + 3 = 5."] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[t for t in SPECIAL_TOKENS if t != REWARD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    foreign = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    foreign.chat_template = CHATML_TEMPLATE
    assert REWARD_TOKEN not in foreign.get_vocab()
    backbone = build_tiny_model(TinyModelSpec(), foreign).model  # embeddings sized to the foreign vocab
    rows = backbone.get_input_embeddings().num_embeddings
    model = RewardModel.from_backbone(backbone, foreign, RewardModelConfig())
    assert model.reward_token_id == rows and backbone.get_input_embeddings().num_embeddings == rows + 1
    encoder = RewardEncoder(foreign, model.cfg)
    batch = encoder.collate([encoder.encode("math", [{"role": "user", "content": "What is 2 + 3?"}], "5.")])
    assert batch["input_ids"][0, -1].item() == rows
    with torch.no_grad():
        assert torch.isfinite(model(**batch)).all()
