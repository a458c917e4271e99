"""Packing documents into fixed-length pretraining blocks, checked against hand-packed streams."""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from data.pretrain_pack import (
    PackConfig,
    SequencePacker,
    TokenizerConfig,
    block_position_ids,
    ids_table,
    pack_in_rank_order,
    tokenize_batch,
    tokenize_texts,
    tokenizer_from_json,
    tokenizer_json,
)

EOS = 0


def test_pack_by_hand():
    # Stream with EOS after each doc: 1 2 3 0 | 4 5 0 | 6 7 8 9 10 0  -> 13 tokens, seq_len 4 -> 3 blocks + tail [0]
    # block 1: [1 2 3 0]  positions 0 1 2 3 (doc 1 and its EOS)
    # block 2: [4 5 0 6]  positions 0 1 2 0 (doc 2 + EOS, then doc 3 starts)
    # block 3: [7 8 9 10] positions 0 1 2 3 (doc 3 continues; positions restart at the block start)
    packer = SequencePacker(seq_len=4, eos_id=EOS)
    blocks, positions = packer.add([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]])
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    assert positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    # The tail [0] (doc 3's EOS) waits: + [11 0] is 3 tokens, no block yet; + [12 13 0] completes [0 11 0 12]
    # with doc starts at index 1 (11) and 3 (12): positions 0 0 1 0; the tail [13 0] waits again.
    assert packer.add([[11]])[0].shape == (0, 4)
    blocks, positions = packer.add([[12, 13]])
    assert blocks.tolist() == [[0, 11, 0, 12]] and positions.tolist() == [[0, 0, 1, 0]]
    assert (packer.tokens_in, packer.blocks) == (13 + 2 + 3, 4)


def test_position_ids_restart_at_doc_and_block_starts():
    starts = np.array([[False, False, True, False, False], [True, False, False, True, True]])
    assert block_position_ids(starts).tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]]


def test_packing_does_not_depend_on_batching():
    rng = random.Random(0)
    docs = [[rng.randrange(1, 100) for _ in range(rng.randint(1, 40))] for _ in range(60)]
    whole = SequencePacker(16, EOS).add(docs)
    packer = SequencePacker(16, EOS)
    parts = [packer.add(docs[i : i + 7]) for i in range(0, len(docs), 7)]
    assert np.array_equal(whole[0], np.concatenate([p[0] for p in parts]))
    assert np.array_equal(whole[1], np.concatenate([p[1] for p in parts]))
    # Only the final tail is lost: total tokens (docs + one EOS each) // 16 blocks
    assert len(whole[0]) == (sum(map(len, docs)) + len(docs)) // 16
    flat = whole[0].reshape(-1)
    stream = [t for d in docs for t in d + [EOS]]
    assert flat.tolist() == stream[: len(flat)]


def test_packing_follows_document_rank_not_arrival_order():
    # Ranks 0..5 arrive as [3 4] [0] [5 1 2]: the first batch waits; doc 0 is packed on the second (4 tokens with
    # its EOS, no full row yet); the third brings 1 and 2, so 1..5 go in. The rows are those of rank order.
    docs = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14], [15], [16, 17, 18]]

    def batch(ranks):
        return pa.table({"rank": pa.array(ranks, pa.int64()), "ids": ids_table([docs[r] for r in ranks]).column("ids")})

    out = list(pack_in_rank_order([batch([3, 4]), batch([0]), batch([5, 1, 2])], 6, SequencePacker(5, EOS)))
    # stream 5 6 7 0 | 8 0 9 10 11 12 0 13 14 0 15 0 | 16 17 18 0 -> rows of 5, tail [0]
    assert [len(b) for b, _ in out] == [0, 4]
    rows = np.concatenate([b for b, _ in out]).tolist()
    assert rows == [[5, 6, 7, 0, 8], [0, 9, 10, 11, 12], [0, 13, 14, 0, 15], [0, 16, 17, 18, 0]]
    assert rows == SequencePacker(5, EOS).add(docs)[0].tolist()
    with pytest.raises(ValueError, match="packing stopped at document 1 of 6"):
        list(pack_in_rank_order([batch([0, 2])], 6, SequencePacker(5, EOS)))
    with pytest.raises(ValueError, match="rank 0 is out of range or repeated"):
        list(pack_in_rank_order([batch([0]), batch([0])], 6, SequencePacker(5, EOS)))


def test_tokenize_matches_hf_tokenizer_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    from data.samples import stdlib_docstrings
    from modeling.tiny import train_tokenizer

    train_tokenizer(stdlib_docstrings()[:200], vocab_size=400, out_dir=tmp_path)
    texts = ["Return the sum of two numbers.", "Ünïcode and  spaces\nnew line"]
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    spec = tokenizer_json(tmp_path)
    ids = tokenize_batch({"text": pa.array(texts)}, spec).column("ids").to_pylist()
    assert ids == hf(texts, add_special_tokens=False)["input_ids"]
    assert ids == tokenize_texts(texts, tokenizer_from_json(spec)) == tokenize_texts(texts, hf)
    assert [hf.decode(i) for i in ids] == texts


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: PackConfig(seq_len=1), "pack.seq_len"),
        (lambda: TokenizerConfig(vocab_size=100), "tokenizer.vocab_size"),
    ],
)
def test_config_validation(build, key):
    with pytest.raises(ValueError, match=key.replace(".", "\\.")):
        build()
