"""SFT data: XTuner's source formats -> one conversation form -> token ids with a loss mask.

Formats (spec §11.3), detected per row (`fmt="auto"`) or forced:
    alpaca    {"instruction", "input", "output"}; input = instruction + "\\n" + input; "<nooutput>" rows dropped
    moss      MOSS-003-SFT {"meta_instruction", "num_turns", "chat": {"turn_1": {"Human", "MOSS", ...}}}
    guanaco   OpenAssistant-Guanaco {"text": "### Human: ... ### Assistant: ..."}
    openai    {"messages": [{"role": system|user|assistant, "content", "loss": optional}]}
    sharegpt  {"conversations": [{"from": human|gpt|system, "value"}]}
    xtuner    XTuner's own {"conversation": [{"system", "input", "output"}]}
    text      incremental pretraining {"text": "..."}: loss on every token, no chat template

Encoding follows XTuner's rule with the tokenizer's own chat template (ChatML for InternLM2): labels are -100
everywhere except on each assistant reply and its end-of-turn token (`<|im_end|>`); what the template puts after
that token (the "\\n" separator) and all system/user/tool text are context only. Every turn of a dialogue is
trained in one pass. Labels are aligned with input_ids (the model shifts them).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from data.io import DataError, RowErrors

FORMATS = ("auto", "alpaca", "moss", "guanaco", "openai", "sharegpt", "xtuner", "text")
IGNORE = -100
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass
class Turn:
    input: str = ""
    output: str = ""
    system: str = ""  # only in the first turn
    input_role: str = "user"  # user | environment (tool results come back as InternLM2's environment role)
    output_loss: bool = True  # False: the reply is context only (OpenAI format's per-message "loss": false)


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    path: str = ""
    line: int | None = None
    text: str | None = None  # set for an incremental-pretraining document instead of turns


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]


@dataclass
class ReadStats:
    rows: int = 0
    conversations: int = 0
    dropped: int = 0  # rows the format itself discards (alpaca "<nooutput>", no answered turn)
    errors: RowErrors = field(default_factory=RowErrors)

    @property
    def skipped(self) -> int:
        return self.errors.skipped


# ---------------------------------------------------------------------------------------------- formats


def detect_format(row: dict) -> str | None:
    if "conversation" in row:
        return "xtuner"
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "chat" in row:
        return "moss"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "guanaco" if isinstance(row["text"], str) and "### Human:" in row["text"] else "text"
    return None


def _str_field(row: dict, key: str, path, line, where: str | None = None, required: bool = True) -> str:
    value = row.get(key)
    name = where or key
    if value is None:
        if required:
            raise DataError(path, line, name, "is missing")
        return ""
    if not isinstance(value, str):
        raise DataError(path, line, name, f"must be a string, got {type(value).__name__}")
    return value


def _alpaca(row, path, line, alpaca_system: str) -> list[Turn] | None:
    instruction = _str_field(row, "instruction", path, line)
    extra = _str_field(row, "input", path, line, required=False)
    output = _str_field(row, "output", path, line)
    if output.strip() == "<nooutput>":
        return None
    text = instruction + ("\n" + extra if extra.strip() else "")
    return [Turn(system=alpaca_system, input=text, output=output)]


def _as_loss_flag(value, path, line, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(path, line, where, f"must be true/false (or \"True\"/\"False\"), got {value!r}")


def _openai(row, path, line) -> list[Turn]:
    messages = row["messages"]
    if not isinstance(messages, list):
        raise DataError(path, line, "messages", "must be a list of {role, content} objects")
    turns, system, user = [], "", ""
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(path, line, where, "must be an object with role and content")
        role = _str_field(m, "role", path, line, f"{where}.role")
        content = _str_field(m, "content", path, line, f"{where}.content")
        if role == "system":
            system += content
        elif role == "user":
            user += content
        elif role == "assistant":
            if not turns and not user and not system:
                continue  # XTuner skips leading assistant messages
            loss = _as_loss_flag(m["loss"], path, line, f"{where}.loss") if "loss" in m else True
            turns.append(Turn(system=system, input=user, output=content, output_loss=loss))
            system, user = "", ""
        else:
            raise DataError(path, line, f"{where}.role", f"must be system, user or assistant, got {role!r}")
    return turns


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt(row, path, line) -> list[Turn]:
    convs = row["conversations"]
    if not isinstance(convs, list):
        raise DataError(path, line, "conversations", "must be a list of {from, value} objects")
    messages = []
    for i, c in enumerate(convs):
        where = f"conversations[{i}]"
        if not isinstance(c, dict):
            raise DataError(path, line, where, "must be an object with from and value")
        who = _str_field(c, "from", path, line, f"{where}.from")
        if who not in _SHAREGPT_ROLES:
            raise DataError(path, line, f"{where}.from", f"must be one of {sorted(_SHAREGPT_ROLES)}, got {who!r}")
        messages.append({"role": _SHAREGPT_ROLES[who], "content": _str_field(c, "value", path, line, f"{where}.value")})
    return _openai({"messages": messages}, path, line)


_GUANACO_SPLIT = re.compile(r"###\s*(Human|Assistant):")


def _guanaco(row, path, line) -> list[Turn]:
    text = _str_field(row, "text", path, line)
    parts = _GUANACO_SPLIT.split(text)
    turns, pending = [], None
    for speaker, body in zip(parts[1::2], parts[2::2]):
        body = body.strip()
        if speaker == "Human":
            pending = body if pending is None else pending + "\n" + body
        elif pending is not None:
            turns.append(Turn(input=pending, output=body))
            pending = None
    return turns  # a trailing unanswered Human turn is dropped, as XTuner does


_MOSS_TAGS = {
    "Human": ("Human", "eoh"),
    "Inner Thoughts": ("Inner Thoughts", "eot"),
    "Commands": ("Commands", "eoc"),
    "Tool Responses": ("Results", "eor"),
    "MOSS": ("MOSS", "eom"),
}


def _moss_value(turn: dict, key: str, path, line, where: str) -> str:
    """Strip MOSS markup `<|Tag|>: text<eox>`; the value 'None' (no thought/command/tool) becomes ''."""
    raw = _str_field(turn, key, path, line, f"{where}.{key}", required=key in ("Human", "MOSS"))
    tag, end = _MOSS_TAGS[key]
    m = re.fullmatch(rf"\s*(?:<\|{re.escape(tag)}\|>:\s?)?(.*?)(?:<{end}>)?\s*", raw, flags=re.S)
    value = m.group(1).strip() if m else raw.strip()
    return "" if value == "None" else value


def _moss(row, path, line) -> list[Turn]:
    chat = row["chat"]
    if not isinstance(chat, dict):
        raise DataError(path, line, "chat", "must be an object {turn_1: {...}, turn_2: {...}}")
    system = _str_field(row, "meta_instruction", path, line, required=False)
    n = row.get("num_turns", len(chat))
    if not isinstance(n, int) or n < 1:
        raise DataError(path, line, "num_turns", f"must be a positive integer, got {n!r}")
    turns: list[Turn] = []
    for k in range(1, n + 1):
        where = f"chat.turn_{k}"
        turn = chat.get(f"turn_{k}")
        if not isinstance(turn, dict):
            raise DataError(path, line, where, "is missing or not an object")
        human = _moss_value(turn, "Human", path, line, where)
        thoughts = _moss_value(turn, "Inner Thoughts", path, line, where)
        commands = _moss_value(turn, "Commands", path, line, where)
        results = _moss_value(turn, "Tool Responses", path, line, where)
        reply = _moss_value(turn, "MOSS", path, line, where)
        sys_text = system if not turns else ""
        if commands:  # a tool call: the call is trained, the tool's answer is context, then the final reply
            call = "\n".join(x for x in (thoughts, commands) if x)
            turns.append(Turn(system=sys_text, input=human, output=call))
            turns.append(Turn(input=results, input_role="environment", output=reply))
        else:
            turns.append(Turn(system=sys_text, input=human, output=reply))
    return turns


def _xtuner(row, path, line) -> list[Turn]:
    conv = row["conversation"]
    if not isinstance(conv, list):
        raise DataError(path, line, "conversation", "must be a list of {system, input, output} objects")
    turns = []
    for i, t in enumerate(conv):
        where = f"conversation[{i}]"
        if not isinstance(t, dict):
            raise DataError(path, line, where, "must be an object with input and output")
        turns.append(
            Turn(
                system=_str_field(t, "system", path, line, f"{where}.system", required=False),
                input=_str_field(t, "input", path, line, f"{where}.input", required=False),
                output=_str_field(t, "output", path, line, f"{where}.output"),
            )
        )
    return turns


def to_conversation(row: dict, fmt: str, path, line, alpaca_system: str = ALPACA_SYSTEM) -> Conversation | None:
    """One row -> Conversation; None when the format itself drops the row. Raises DataError when malformed."""
    chosen = detect_format(row) if fmt == "auto" else fmt
    if chosen is None:
        raise DataError(
            path, line, None,
            f"matches no SFT format (keys: {sorted(row)[:6]}); expected one of messages, conversations, chat, "
            "instruction+output, conversation or text, or set data.format",
        )
    if chosen == "text":
        return Conversation(text=_str_field(row, "text", path, line), path=str(path), line=line)
    required = {"openai": "messages", "sharegpt": "conversations", "moss": "chat", "xtuner": "conversation"}
    if chosen in required and required[chosen] not in row:
        raise DataError(path, line, required[chosen], f"is missing (data.format={fmt})")
    parse = {"openai": _openai, "sharegpt": _sharegpt, "guanaco": _guanaco, "moss": _moss, "xtuner": _xtuner}
    turns = _alpaca(row, path, line, alpaca_system) if chosen == "alpaca" else parse[chosen](row, path, line)
    if not turns:
        return None
    return Conversation(turns=turns, path=str(path), line=line)


def read_conversations(
    paths: Iterable[str | Path], fmt: str = "auto", on_error: str = "fail", alpaca_system: str = ALPACA_SYSTEM
) -> tuple[list[Conversation], ReadStats]:
    """Every JSONL row of `paths` as a Conversation; malformed rows raise or are counted (on_error)."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    stats = ReadStats(errors=RowErrors(policy=on_error))
    out: list[Conversation] = []
    for path in paths:
        for line, row, bad in _jsonl_rows(path):
            stats.rows += 1
            try:
                if bad is not None:
                    raise bad
                conv = to_conversation(row, fmt, path, line, alpaca_system)
            except DataError as e:
                stats.errors.handle(e)
                continue
            if conv is None:
                stats.dropped += 1
            else:
                out.append(conv)
    stats.conversations = len(out)
    return out, stats


def _jsonl_rows(path):
    """(line, row, None) per JSON object line, or (line, None, DataError) for a bad line, so on_error=skip can
    continue past it (data.io.read_jsonl stops at the first bad line)."""
    import json

    import fsspec

    with fsspec.open(str(path), "rt") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, None, DataError(path, lineno, None, f"is not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield lineno, None, DataError(path, lineno, None, f"must be a JSON object, got {type(row).__name__}")
                continue
            yield lineno, row, None


# ---------------------------------------------------------------------------------------------- encoding


def conversation_messages(conv: Conversation) -> list[dict]:
    """Turns -> chat messages {role, content, loss} in the order the template renders them."""
    messages = []
    for t in conv.turns:
        if t.system:
            messages.append({"role": "system", "content": t.system, "loss": False})
        if t.input:
            messages.append({"role": t.input_role, "content": t.input, "loss": False})
        messages.append({"role": "assistant", "content": t.output, "loss": t.output_loss})
    return messages


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn and stops generation: ChatML's <|im_end|>, else EOS."""
    vocab = tokenizer.get_vocab()
    return "<|im_end|>" if "<|im_end|>" in vocab else tokenizer.eos_token


def template_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split the chat-template rendering of `messages` into (text, trained) pieces.

    Renders growing prefixes of the conversation and takes the differences, so it works for any template that
    only appends (ChatML does). An assistant message splits into its header (context), its content plus the
    end-of-turn token (trained unless loss=false), and whatever the template adds after that (context)."""
    def render(msgs, gen=False):
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=gen) if plain or gen else ""

    stop = end_of_turn_token(tokenizer)
    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = render(messages[:i], gen=True)
            _check_prefix(prev, head)
            segments.append((head[len(prev):], False))
            prev = head
        full = render(messages[: i + 1])
        _check_prefix(prev, full)
        delta = full[len(prev):]
        if m["role"] == "assistant":
            at = delta.find(m["content"]) + len(m["content"]) if m["content"] in delta else 0
            end = delta.find(stop, at)
            cut = end + len(stop) if end >= 0 else len(delta)
            segments += [(delta[:cut], bool(m["loss"])), (delta[cut:], False)]
        else:
            segments.append((delta, False))
        prev = full
    return [(text, trained) for text, trained in segments if text]


def _check_prefix(prev: str, new: str) -> None:
    if not new.startswith(prev):
        raise ValueError(
            "the tokenizer's chat template rewrites earlier turns when a turn is added, so per-turn loss masks "
            "cannot be derived from it; use a template that only appends (ChatML does)"
        )


def encode(conv: Conversation, tokenizer, max_length: int) -> list[EncodedSample]:
    """Token ids + labels. A chat is truncated to max_length; a text document is cut into max_length pieces."""
    if conv.text is not None:
        return _encode_text(conv, tokenizer, max_length)
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in template_segments(conversation_messages(conv), tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):
        raise DataError(
            conv.path, conv.line, None,
            f"has no trained (assistant) token within data.max_length={max_length}; raise data.max_length "
            "or drop the row",
        )
    return [EncodedSample(ids, labels)]


def _encode_text(conv: Conversation, tokenizer, max_length: int) -> list[EncodedSample]:
    # XTuner's incremental pretraining: [bos] + document, loss everywhere, no eos; long documents continue in
    # the next piece rather than being thrown away.
    ids = tokenizer(conv.text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < 2:
        raise DataError(conv.path, conv.line, "text", "is empty")
    pieces = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [EncodedSample(list(p), list(p)) for p in pieces if len(p) >= 2]


def encode_all(convs: list[Conversation], tokenizer, max_length: int, errors: RowErrors) -> list[EncodedSample]:
    out: list[EncodedSample] = []
    for conv in convs:
        try:
            out += encode(conv, tokenizer, max_length)
        except DataError as e:
            errors.handle(e)
    return out
