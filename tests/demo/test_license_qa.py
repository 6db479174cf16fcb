"""The license question-and-answer domain: messages records quoting a license's own sentences."""

import json
from pathlib import Path

from mft_pipeline.data.corpus import load_documents
from mft_pipeline.demo import corpora, license_qa, licenses

ZLIB = """---
key: zlib
short_name: ZLIB License
---

This software is provided 'as-is', without any express or implied
warranty.  In no event will the authors be held liable for any damages
arising from the use of this software.

Permission is granted to anyone to use this software for any purpose,
including commercial applications, and to alter it and redistribute it
freely, subject to the following restrictions:

2. Altered source versions must be plainly marked as such, and must not be
   misrepresented as being the original software.
"""

# A variant: zlib's sentences, and one more topic of its own. Files are read in name order, zlib first.
ZLIB_VARIANT = ZLIB.replace("key: zlib", "key: zlib2").replace("ZLIB License", "zlib/libpng Acknowledgement") + (
    "\nThis notice may not be removed or altered; no fee is charged for it.\n"
)


def test_records_quote_the_first_sentence_on_each_topic_once(tmp_path: Path):
    (tmp_path / "zlib.LICENSE").write_text(ZLIB, encoding="utf-8")
    (tmp_path / "zlib2.LICENSE").write_text(ZLIB_VARIANT, encoding="utf-8")
    docs = list(licenses.license_documents(tmp_path))
    assert [(d["id"], d["name"]) for d in docs] == [("zlib", "ZLIB License"), ("zlib2", "zlib/libpng Acknowledgement")]
    records = list(license_qa.license_qa_records(docs))
    by_id = {r["id"]: r["messages"] for r in records}
    warranty = "This software is provided 'as-is', without any express or implied warranty."
    assert by_id["zlib/warranties"] == [
        {"role": "user", "content": "What does the ZLIB License say about warranties?"},
        {"role": "assistant", "content": f'The ZLIB License says: "{warranty}"'},
    ]
    assert by_id["zlib/liability"][1]["content"].endswith('"In no event will the authors be held liable for any damages arising from the use of this software."')
    assert "zlib/redistribution" in by_id and "zlib/modifications" not in by_id  # "alter" is not "modif"
    # The variant repeats zlib's sentences: only its own new topic is asked about, and its name gets "license".
    assert sorted(i for i in by_id if i.startswith("zlib2/")) == ["zlib2/fees-and-payment"]
    assert by_id["zlib2/fees-and-payment"][0]["content"] == "What does the zlib/libpng Acknowledgement license say about fees and payment?"
    for messages in by_id.values():  # every answer quotes the license verbatim, whitespace collapsed
        quoted = messages[1]["content"].split('says: "', 1)[1][:-1]
        assert license_qa.MIN_CHARS <= len(quoted) <= license_qa.MAX_CHARS
        assert quoted in " ".join((ZLIB + ZLIB_VARIANT).split())


def test_written_corpus_reads_back_as_messages_records(tmp_path: Path):
    records = [{"id": "a/x", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}]
    out = tmp_path / "qa.jsonl"
    assert corpora.write_jsonl(records, out) == (1, len("Q?A."))
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    (record,) = load_documents(out)
    assert record.format == "messages" and list(record.completion) == records[0]["messages"]
    # A character cap keeps whole records; a first record over it is kept whole rather than cut.
    assert corpora.write_jsonl(records * 3, tmp_path / "capped.jsonl", max_chars=2) == (1, 4)
