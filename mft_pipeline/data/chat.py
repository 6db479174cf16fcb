"""Instruction and chat records: checking them, rendering them, and finding the answer's tokens.

Two record formats besides plain text, as TRL's SFTTrainer reads them:

- ``prompt``/``completion``: both strings (the text is ``prompt + completion``, no template),
  or both lists of messages (rendered with the chat template). The completion is the target.
- ``messages``: a list of ``{"role", "content"}``, rendered with the chat template. The
  assistant turns are the targets, or every turn with ``all_turns``.

A turn's characters are found by rendering the conversation prefix by prefix: turn ``i`` is
what ``render(messages[: i + 1])`` adds to ``render(messages[:i])`` (with the generation prompt
when turn ``i`` is the assistant's, so its header is not a target). This works for any template
whose renderings of a conversation's prefixes are prefixes of the whole rendering, and needs no
generation markers in the template; a template that is not is refused, naming the record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from mft_pipeline.errors import MFTError

FORMATS = ("text", "prompt_completion", "messages")


class ChatError(MFTError, ValueError):
    """A record that can't be rendered; the message names its file and line."""


@dataclass(frozen=True)
class ChatRecord:
    """One instruction or chat record, checked.

    Attributes:
        format: "prompt_completion" or "messages".
        prompt: the prompt (a string or a tuple of messages); None for "messages".
        completion: the completion (string or messages), or the conversation for "messages".
        source: "FILE, line N": where the record came from, for error messages.
    """

    format: str
    prompt: str | tuple | None
    completion: str | tuple
    source: str

    def key(self) -> str:
        """The record's content as canonical JSON: what the train/validation split hashes."""
        return json.dumps([self.format, self.prompt, self.completion], sort_keys=True, ensure_ascii=False)


def record_format(columns) -> str:
    """The record format a table's columns hold: "messages", "prompt_completion" or "text"."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    return "text"


def _messages(value, what: str, source: str) -> tuple:
    if value is None:
        raise ChatError(f"{source}: has no {what} (keep one record format per corpus)")
    if not isinstance(value, (list, tuple)) or not value:
        raise ChatError(f"{source}: {what} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ChatError(f"{source}: {what}[{j}] must be an object with 'role' and 'content', got {type(m).__name__}")
        # Columnar readers fill keys that other rows have with None; drop them again.
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ChatError(f"{source}: {what}[{j}] has no 'role' string")
        if not isinstance(m.get("content"), str):
            raise ChatError(f"{source}: {what}[{j}] has no 'content' string")
        out.append(m)
    return tuple(out)


def check_record(row: dict, fmt: str, source: str) -> ChatRecord:
    """A checked record from one table row, or ChatError naming ``source``."""
    if fmt == "messages":
        conversation = _messages(row.get("messages"), "'messages'", source)
        return ChatRecord("messages", None, conversation, source)
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise ChatError(f"{source}: 'completion' is empty; there is nothing to train on")
        return ChatRecord("prompt_completion", prompt, completion, source)
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        return ChatRecord("prompt_completion", _messages(prompt, "'prompt'", source), _messages(completion, "'completion'", source), source)
    raise ChatError(
        f"{source}: 'prompt' and 'completion' must both be strings or both be lists of messages, "
        f"got {type(prompt).__name__} and {type(completion).__name__}"
    )


def read_template(path: str | None) -> str | None:
    """The Jinja chat template in file ``path``; None for no file (the tokenizer's own is used)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"--chat-template {path}: can't be read ({e})") from None


def template_digest(template: str | None) -> str | None:
    """What a cache's manifest records of a --chat-template: the sha256 of its text; None for the tokenizer's own."""
    return None if template is None else hashlib.sha256(template.encode()).hexdigest()


def _render(tokenizer, messages, template: str | None, source: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )
    except Exception as e:  # jinja raises TemplateError (e.g. roles must alternate); HF raises ValueError without a template
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ChatError(f"{source}: the chat template could not render this record: {first}") from None


def _span(full: str, before: str, after: str, source: str, turn: int) -> tuple[int, int]:
    if not (after.startswith(before) and full.startswith(after)):
        raise ChatError(
            f"{source}: the chat template renders turn {turn} differently once later turns follow, so its "
            "tokens can't be found; use --chat-template with a template that renders conversations prefix by prefix"
        )
    return len(before), len(after)


def render(record: ChatRecord, tokenizer, template: str | None = None, all_turns: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The record's text and its target character spans ``[(start, end), ...]``."""
    if isinstance(record.completion, str):
        return record.prompt + record.completion, [(len(record.prompt), len(record.prompt) + len(record.completion))]
    if record.format == "prompt_completion":
        full = _render(tokenizer, record.prompt + record.completion, template, record.source)
        opens = record.completion[0]["role"] == "assistant"
        before = _render(tokenizer, record.prompt, template, record.source, generation_prompt=opens)
        return full, [_span(full, before, full, record.source, len(record.prompt))]
    conversation = record.completion
    full = _render(tokenizer, conversation, template, record.source)
    if all_turns:
        return full, [(0, len(full))]
    spans = []
    for i, m in enumerate(conversation):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, conversation[:i], template, record.source, generation_prompt=True) if i else ""
        after = _render(tokenizer, conversation[: i + 1], template, record.source)
        spans.append(_span(full, before, after, record.source, i))
    if not spans:
        raise ChatError(f"{record.source}: the conversation has no assistant turn to train on (or use --all-turns)")
    return full, spans


def target_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens hold target characters.

    Args:
        offsets: (L, 2) each token's character range ``[start, end)`` in the rendered text.
        spans: target character ranges.
    Returns: (L,) bool; a token is a target when it overlaps a span (an empty token: when it
    starts inside one), so a token merging a header's last character with the answer's first
    is a target.
    """
    start, end = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (start < b) & (end > a)
    return mask


def tokenize_records(records: list[ChatRecord], tokenizer, template: str | None = None, all_turns: bool = False, bos: int | None = None):
    """Each record's token ids followed by EOS, and which of them are targets.

    A leading BOS that the template writes is dropped when ``bos`` is given: packing then
    starts every row with it. EOS is a target when the record's last token is.
    Returns: list of ((L,) int32 ids, (L,) bool targets).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ChatError("instruction and chat corpora need a fast tokenizer (one with offset mappings)")
    eos = tokenizer.eos_token_id
    out = []
    for r in records:
        text, spans = render(r, tokenizer, template, all_turns)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        mask = target_mask(np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2), spans)
        if bos is not None and len(ids) and ids[0] == bos:
            ids, mask = ids[1:], mask[1:]
        if not mask.any():
            raise ChatError(f"{r.source}: the record's target renders to no tokens")
        out.append((np.append(ids, np.int32(eos)), np.append(mask, mask[-1])))
    return out
