"""Malformed corpora, made by a machine: the corpus reader returns real documents or says what is wrong with which file."""

from __future__ import annotations

import uuid

from hypothesis import given, settings

from corpus_strategies import EXAMPLES, SETTINGS, corpora
from mft_pipeline.data.corpus import CorpusError, load_corpus


@settings(SETTINGS, max_examples=2 * EXAMPLES)
@given(corpus=corpora())
def test_corpus_reader_reads_or_refuses_clearly(tmp_path, corpus):
    suffix, data = corpus
    path = tmp_path / f"{uuid.uuid4().hex}{suffix}"
    path.write_bytes(data)
    try:
        loaded = load_corpus(path, val_fraction=0.2)
    except CorpusError as e:
        message = str(e)
        assert message and "\n" not in message.strip() and str(path) in message
        return
    docs = loaded.train + loaded.validation
    assert docs and all(isinstance(d, str) and d.strip() for d in docs)
