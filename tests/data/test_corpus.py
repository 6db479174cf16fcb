from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import make_documents, write_jsonl
from mft_pipeline.data.corpus import CorpusError, load_documents, split_documents


@pytest.fixture
def docs():
    return make_documents(30)


def test_formats_read_the_same_documents(tmp_path, docs):
    write_jsonl(tmp_path / "a.jsonl", docs)
    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), tmp_path / "a.parquet")
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "b.txt").write_text("\n\n".join(docs[15:]))
    (txt / "a.txt").write_text("\n\n".join(docs[:15]))
    import datasets

    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))

    assert load_documents(tmp_path / "a.jsonl") == docs
    assert load_documents(tmp_path / "a.jsonl.zst") == docs
    assert load_documents(tmp_path / "a.parquet") == docs
    assert [d.strip() for d in load_documents(txt, sample_by="paragraph")] == docs  # files in sorted order
    assert len(load_documents(txt, sample_by="document")) == 2
    assert load_documents(tmp_path / "saved", text_field="body") == docs


def test_configurable_text_field(tmp_path, docs):
    write_jsonl(tmp_path / "a.jsonl", docs, field="content")
    assert load_documents(tmp_path / "a.jsonl", text_field="content") == docs
    with pytest.raises(CorpusError, match="no text field 'text'"):
        load_documents(tmp_path / "a.jsonl")


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("x.jsonl", b"", "empty"),
        ("x.jsonl", b'{"text": "ok"}\n{broken\n', "x.jsonl, line 2: could not be read as JSON"),
        ("x.jsonl", b'{"text": "ok"}\n\n[1, 2]\n', "x.jsonl, line 3: a record must be a JSON object, got list"),
        ("x.txt", b"caf\xe9\n", "UTF-8 at byte 3"),
        # The offset counts from the file's start, across the lines before the bad one.
        ("x.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "x.jsonl: not valid UTF-8 at byte 28"),
        ("x.csv", b"text\nhello\n", "unknown corpus format"),
        ("x.jsonl", b'{"text": 5}\n', "not text|could not be read"),
    ],
)
def test_bad_corpora_are_refused_clearly(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match=match):
        load_documents(tmp_path / name)


def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        load_documents(tmp_path / "nope.jsonl")


def test_split_is_deterministic_by_document_and_disjoint(docs):
    a = split_documents(docs, 0.3)
    b = split_documents(list(reversed(docs)), 0.3)
    assert set(a.validation) == set(b.validation) and set(a.train) == set(b.train)
    assert not set(a.validation) & set(a.train)
    assert 0 < len(a.validation) < len(docs)
    # Adding documents never moves existing ones between splits.
    c = split_documents(docs + make_documents(10, seed=9), 0.3)
    assert set(a.validation) <= set(c.validation)
    assert a.fingerprint != b.fingerprint  # order is part of the corpus identity
    assert split_documents(docs, 0.0).validation == []
