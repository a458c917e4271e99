"""SFT formats -> one conversation form -> ChatML token ids with loss only on assistant replies (+ <|im_end|>)."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from cluster.runtime_env import REPO_ROOT
from data.io import DataError
from data.sft import (
    ALPACA_SYSTEM,
    IGNORE,
    Conversation,
    Turn,
    detect_format,
    encode,
    read_conversations,
    to_conversation,
)

SAMPLES = REPO_ROOT / "data" / "sample_sft"


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(str(tiny_dir))


def _conv(row, fmt="auto"):
    return to_conversation(row, fmt, "mem.jsonl", 1)


def test_alpaca_joins_instruction_and_input_and_drops_nooutput():
    conv = _conv({"instruction": "Add the numbers.", "input": "1 and 2", "output": "3"})
    assert conv.turns == [Turn(system=ALPACA_SYSTEM, input="Add the numbers.\n1 and 2", output="3")]
    assert _conv({"instruction": "Draw.", "input": "", "output": "<nooutput>"}) is None


def test_guanaco_pairs_turns_and_drops_a_trailing_question():
    conv = _conv({"text": "### Human: Hi### Assistant: Hello.### Human: 2+3?### Assistant: 5### Human: Bye"})
    assert [(t.input, t.output) for t in conv.turns] == [("Hi", "Hello."), ("2+3?", "5")]


def test_openai_accumulates_system_and_user_and_honours_loss_flags():
    conv = _conv({"messages": [
        {"role": "assistant", "content": "leading reply is skipped"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Whatever.", "loss": "False"},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Hello!", "loss": True},
    ]})
    assert conv.turns == [
        Turn(system="Be brief.", input="Hi", output="Whatever.", output_loss=False),
        Turn(input="Again?", output="Hello!"),
    ]


def test_sharegpt_maps_from_value_pairs():
    conv = _conv({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                    {"from": "gpt", "value": "A"}]})
    assert conv.turns == [Turn(system="S", input="Q", output="A")]


def test_moss_strips_markup_and_turns_a_tool_call_into_an_environment_turn():
    conv = _conv({"meta_instruction": "You are MOSS.", "num_turns": 2, "chat": {
        "turn_1": {"Human": "<|Human|>: 12*12?<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: Use it.<eot>\n",
                   "Commands": "<|Commands|>: Calc(\"12*12\")<eoc>\n", "Tool Responses": "<|Results|>: 144<eor>\n",
                   "MOSS": "<|MOSS|>: It is 144.<eom>\n"},
        "turn_2": {"Human": "<|Human|>: Thanks<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
                   "Commands": "<|Commands|>: None<eoc>\n", "Tool Responses": "<|Results|>: None<eor>\n",
                   "MOSS": "<|MOSS|>: You are welcome.<eom>\n"}}})
    assert conv.turns == [
        Turn(system="You are MOSS.", input="12*12?", output='Use it.\nCalc("12*12")'),
        Turn(input="144", input_role="environment", output="It is 144."),
        Turn(input="Thanks", output="You are welcome."),
    ]


def test_every_shipped_sample_file_is_detected_as_its_format():
    for path in sorted(SAMPLES.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert rows and {detect_format(r) for r in rows} == {path.stem}, path
    convs, stats = read_conversations(sorted(SAMPLES.glob("*.jsonl")))
    assert stats.skipped == 0 and stats.dropped == 1  # the alpaca <nooutput> row
    assert stats.conversations == stats.rows - 1 == len(convs)


def test_multi_turn_label_mask_is_exact(tok):
    """Loss on each reply and its <|im_end|>; system/user text, headers and the "\\n" separators are context."""
    conv = _conv({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
    ]})
    # The ChatML rendering written out by hand, cut where the loss switches on and off.
    context_1 = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    reply_1 = "Hello!<|im_end|>"
    context_2 = "\n<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    reply_2 = "5<|im_end|>"
    context_3 = "\n"

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    [sample] = encode(conv, tok, max_length=512)
    assert sample.input_ids == ids(context_1 + reply_1 + context_2 + reply_2 + context_3)
    expected = (
        [IGNORE] * len(ids(context_1)) + ids(reply_1) + [IGNORE] * len(ids(context_2)) + ids(reply_2)
        + [IGNORE] * len(ids(context_3))
    )
    assert sample.labels == expected
    # Position by position around the five <|im_end|> tokens: only those closing a reply are trained.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(sample.input_ids) if t == im_end]
    assert len(ends) == 5
    assert [sample.labels[i] == im_end for i in ends] == [False, False, True, False, True]
    assert sample.labels[-1] == IGNORE and sample.input_ids[-1] == ids("\n")[0]
    trained = [t for t in sample.labels if t != IGNORE]
    assert tok.decode(trained) == "Hello!<|im_end|>5<|im_end|>"


def test_reply_with_loss_false_is_context_only(tok):
    conv = Conversation(turns=[Turn(input="Hi", output="Whatever.", output_loss=False), Turn(input="Again", output="Hello!")])
    [sample] = encode(conv, tok, max_length=512)
    trained = [t for t in sample.labels if t != IGNORE]
    assert tok.decode(trained) == "Hello!<|im_end|>"


def test_environment_turn_renders_as_its_own_role_without_loss(tok):
    conv = Conversation(turns=[Turn(input="q", output="call()"), Turn(input="144", input_role="environment", output="144.")])
    [sample] = encode(conv, tok, max_length=512)
    text = tok.decode(sample.input_ids)
    assert "<|im_start|>environment\n144<|im_end|>\n<|im_start|>assistant\n144.<|im_end|>" in text
    assert tok.decode([t for t in sample.labels if t != IGNORE]) == "call()<|im_end|>144.<|im_end|>"


def test_text_rows_train_every_token_and_are_cut_into_max_length_pieces(tok):
    conv = _conv({"text": "Paris is the capital of France. " * 6})
    assert conv.text is not None
    pieces = encode(conv, tok, max_length=16)
    doc = [tok.bos_token_id] + tok(conv.text, add_special_tokens=False)["input_ids"]
    assert [len(p.input_ids) for p in pieces][:-1] == [16] * (len(pieces) - 1)
    assert sum((p.input_ids for p in pieces), []) == doc[: sum(len(p.input_ids) for p in pieces)]
    assert all(p.labels == p.input_ids for p in pieces)


def test_malformed_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad_role = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad_role) + "\n{not json\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError) as err:
        read_conversations([path])
    assert str(err.value).startswith(f"{path}:2: field 'messages[1].role'")
    assert (err.value.path, err.value.line, err.value.field_name) == (str(path), 2, "messages[1].role")

    convs, stats = read_conversations([path], on_error="skip")
    assert len(convs) == 2 and stats.skipped == 2 and stats.rows == 4
    assert f"{path}:3:" in stats.errors.examples[1]


def test_forced_format_reports_the_missing_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl:1: field 'conversations' is missing"):
        read_conversations([path], fmt="sharegpt")
