"""Instruction and chat records: rendering with a chat template, and which tokens are targets."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corpus_strategies import EXAMPLES, SETTINGS, chat_lines

from mft_pipeline.data.chat import ChatError, ChatRecord, render, tokenize_records
from mft_pipeline.data.corpus import CorpusError, load_corpus
from mft_pipeline.data.packing import pack_documents, pack_records
from mft_pipeline.errors import MFTError

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}> {{ m.content }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
WORDS = "<system> <user> <assistant> </s> be brief what is two plus two four and three five Q: A: long".split()


def word_tokenizer(template: str | None = TEMPLATE):
    """One token per space-separated word, so masks can be written out by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    fast.chat_template = template
    return fast


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATION = (
    msg("system", "be brief"),
    msg("user", "what is two plus two"),
    msg("assistant", "four"),
    msg("user", "and two plus three"),
    msg("assistant", "five"),
)


def tokens_and_mask(record, tok, **kw):
    [(ids, mask)] = tokenize_records([record], tok, **kw)
    return tok.convert_ids_to_tokens(ids.tolist()), mask.tolist()


def test_multi_turn_only_assistant_turns_are_targets():
    tok = word_tokenizer()
    text, _ = render(ChatRecord("messages", None, CONVERSATION, "x"), tok)
    # Rendered by hand from TEMPLATE.
    assert text == (
        "<system> be brief </s> <user> what is two plus two </s> <assistant> four </s> "
        "<user> and two plus three </s> <assistant> five </s> "
    )
    tokens, mask = tokens_and_mask(ChatRecord("messages", None, CONVERSATION, "x"), tok)
    expected = [
        ("<system>", 0), ("be", 0), ("brief", 0), ("</s>", 0),
        ("<user>", 0), ("what", 0), ("is", 0), ("two", 0), ("plus", 0), ("two", 0), ("</s>", 0),
        ("<assistant>", 0), ("four", 1), ("</s>", 1),
        ("<user>", 0), ("and", 0), ("two", 0), ("plus", 0), ("three", 0), ("</s>", 0),
        ("<assistant>", 0), ("five", 1), ("</s>", 1),
        ("<eos>", 1),
    ]  # fmt: skip
    assert list(zip(tokens, map(int, mask))) == expected


def test_all_turns_makes_every_token_a_target():
    _, mask = tokens_and_mask(ChatRecord("messages", None, CONVERSATION, "x"), word_tokenizer(), all_turns=True)
    assert all(mask)


def test_prompt_completion_strings_are_concatenated_without_template():
    tok = word_tokenizer(template=None)
    tokens, mask = tokens_and_mask(ChatRecord("prompt_completion", "Q: two plus two A:", " four", "x"), tok)
    assert tokens == ["Q:", "two", "plus", "two", "A:", "four", "<eos>"]
    assert mask == [False] * 5 + [True, True]


def test_prompt_completion_message_lists_target_the_completion():
    record = ChatRecord("prompt_completion", CONVERSATION[:4], CONVERSATION[4:], "x")
    tokens, mask = tokens_and_mask(record, word_tokenizer())
    assert tokens[-4:] == ["<assistant>", "five", "</s>", "<eos>"]
    assert mask == [False] * (len(tokens) - 3) + [True] * 3


def test_chat_template_argument_overrides_and_missing_template_is_refused():
    record = ChatRecord("messages", None, CONVERSATION[1:3], "f.jsonl, line 4")
    with pytest.raises(ChatError, match="f.jsonl, line 4"):
        tokenize_records([record], word_tokenizer(template=None))
    other = TEMPLATE.replace("</s>", "</s> </s>")
    tokens, mask = tokens_and_mask(record, word_tokenizer(template=None), template=other)
    assert tokens[-4:] == ["four", "</s>", "</s>", "<eos>"] and mask[-4:] == [True] * 4 and sum(mask) == 4


def test_template_that_rewrites_earlier_turns_is_refused():
    # Numbers every turn by the conversation's length: a prefix renders differently.
    template = "{% for m in messages %}{{ messages|length }} <{{ m.role }}> {{ m.content }} {% endfor %}"
    with pytest.raises(ChatError, match="prefix by prefix"):
        tokenize_records([ChatRecord("messages", None, CONVERSATION, "x")], word_tokenizer(template))


def test_conversation_without_assistant_turn_is_refused():
    with pytest.raises(ChatError, match="no assistant turn"):
        tokenize_records([ChatRecord("messages", None, CONVERSATION[:2], "x")], word_tokenizer())


def test_records_kept_whole_in_rows_where_they_fit():
    tok = word_tokenizer()
    short = ChatRecord("messages", None, CONVERSATION[1:3], "x")  # 11 tokens with EOS
    packed = pack_documents([short, short, short], tok, seq_len=25)
    # Two fit one row (22 tokens), the third starts the next.
    assert packed.num_tokens.tolist() == [22, 11]
    (ids, mask), = tokenize_records([short], tok)
    assert (packed.input_ids[0, :22] == np.concatenate([ids, ids])).all()
    # Position t's label is token t + 1.
    assert (packed.target[0, :21] == np.concatenate([mask, mask])[1:]).all()
    assert not packed.target[:, 21:].any() and (packed.input_ids[1, 11:] == tok.eos_token_id).all()


@pytest.mark.parametrize("bos", [None, 99])
def test_prompt_longer_than_a_row_is_cut_and_rows_without_target_dropped(bos):
    seq_len = 8
    ids = np.arange(100, 130, dtype=np.int32)
    mask = np.zeros(30, bool)
    mask[-4:] = True  # a 26-token prompt, then the answer
    packed = pack_records([(ids[:3], np.array([0, 1, 1], bool)), (ids, mask)], seq_len, pad_id=0, bos=bos)
    start = 0 if bos is None else 1
    # The short record has its own row; every target token of the long one is a label exactly once,
    # in a row that holds the tokens before it.
    targets = [int(t) for row, m in zip(packed.input_ids[1:], packed.target[1:]) for t in row[1:][m]]
    assert targets == ids[-4:].tolist()
    # Rows of the prompt alone are dropped: the long record keeps only the rows its answer ends up in.
    assert packed.target.any(1).all() and len(packed) == 3  # 30 tokens would make 5 rows
    assert (packed.num_tokens[1:] >= 2).all() and packed.input_ids[1, start] < ids[-4]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_corpus_reads_formats_and_names_the_bad_line(tmp_path):
    conv = {"messages": list(CONVERSATION)}
    corpus = load_corpus(write(tmp_path / "c.jsonl", [conv] * 3), val_fraction=0.0)
    assert len(corpus.train) == 3 and corpus.train[0].completion == CONVERSATION
    bad = write(tmp_path / "bad.jsonl", [conv, conv, {"messages": [{"role": "user"}]}])
    with pytest.raises(CorpusError, match=r"bad.jsonl, line 3: 'messages'\[0\] has no 'content'"):
        load_corpus(bad)
    mixed = write(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ["x"]}])
    with pytest.raises(CorpusError, match="mixed.jsonl"):
        load_corpus(mixed)


def test_mixed_formats_in_one_folder_are_refused(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "a.jsonl", [{"text": "plain"}])
    write(folder / "b.jsonl", [{"messages": list(CONVERSATION)}])
    with pytest.raises(CorpusError, match="keep one record format"):
        load_corpus(folder)


def test_formats_mixed_within_one_file_are_refused_before_parsing(tmp_path):
    # This file once killed the process inside pyarrow's JSON reader instead of raising:
    # a chat record, text records, a blank line, then a long string where messages belong.
    lines = [
        json.dumps({"messages": ["\u00ce\u00c2\U000e9f74"]}),
        json.dumps({"text": ""}),
        json.dumps({"text": ""}),
        json.dumps({"text": "\U00103aba"}),
        "",
        json.dumps({"messages": "\U000f1853 " * 32_588}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(CorpusError, match=r"mixed.jsonl, line 2: a text record, but line 1 is a messages record"):
        load_corpus(path)
    # The same mix later in a file is found too.
    write(path, [{"text": "a"}] * 3 + [{"prompt": "q", "completion": "a"}])
    with pytest.raises(CorpusError, match=r"line 4: a prompt_completion record, but line 1 is a text record"):
        load_corpus(path)


def test_split_hashes_the_whole_record(tmp_path):
    rows = [{"messages": [msg("user", f"q{i % 7}"), msg("assistant", f"a{i}")]} for i in range(200)]
    corpus = load_corpus(write(tmp_path / "c.jsonl", rows + rows), val_fraction=0.3)
    train, val = {r.key() for r in corpus.train}, {r.key() for r in corpus.validation}
    assert train and val and not train & val
    # Same question, different answers: split apart, so the hash covers the answers too.
    assert {r.completion[0]["content"] for r in corpus.train} & {r.completion[0]["content"] for r in corpus.validation}


@settings(SETTINGS, max_examples=2 * EXAMPLES)
@given(lines=st.lists(chat_lines, min_size=1, max_size=6))
def test_malformed_chat_records_are_refused_clearly(tmp_path, lines):
    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("\n".join(lines))
    try:
        corpus = load_corpus(path, val_fraction=0.0)
        packed = pack_documents(corpus.train, word_tokenizer(), seq_len=16)
    except MFTError as e:
        message = str(e)
        assert message and "\n" not in message.strip() and str(path) in message
        return
    if isinstance(corpus.train[0], ChatRecord):
        assert packed.target is not None and packed.target.any(1).all()
