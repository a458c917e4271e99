"""Packed SFT rows: whole samples, per-sample positions, and no attention across sample boundaries."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from data.sft import IGNORE, EncodedSample
from data.sft_packing import collate, pack_samples


def _sample(start: int, n: int) -> EncodedSample:
    ids = list(range(start, start + n))
    return EncodedSample(ids, ids)


def test_pack_keeps_samples_whole_and_masks_each_first_label():
    rows = pack_samples([_sample(10, 5), _sample(20, 4), _sample(30, 6)], max_length=10, shuffle=False)
    assert [r.seq_lens for r in rows] == [[5, 4], [6]]  # 5 + 4 fit in 10; 6 more would not
    assert rows[0].input_ids == list(range(10, 15)) + list(range(20, 24))
    # label of a sample's first token would be predicted from the previous sample's last token
    assert rows[0].labels == [IGNORE, 11, 12, 13, 14, IGNORE, 21, 22, 23]
    batch = collate([vars(r) for r in rows], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]]
    assert batch["input_ids"][1].tolist() == list(range(30, 36)) + [0, 0, 0]
    assert batch["labels"][1, 6:].tolist() == [IGNORE] * 3 and int(batch["num_tokens"]) == 15


def test_a_packed_sample_sees_nothing_of_the_sample_before_it(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    a, b = list(range(40, 47)), list(range(100, 105))
    packed = collate([{"input_ids": a + b, "seq_lens": [7, 5]}], pad_id=0)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone_a = model(input_ids=torch.tensor([a]), use_cache=False).logits
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits
        # Control: the same tokens as one sequence (positions 0..11) let b attend to a.
        joined = model(input_ids=packed["input_ids"], use_cache=False).logits
    torch.testing.assert_close(together[:, :7], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 7:], alone_b, atol=1e-5, rtol=1e-5)
    assert (joined[:, 7:] - alone_b).abs().max() > 1e-2  # the check above would see contamination
