"""Hypothesis strategies for malformed corpora, shared by the corpus reader's and stage one's tests."""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# A document's text: any Unicode (surrogates excluded: they cannot be written as UTF-8),
# empty, blank, or huge.
texts = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", " ", "\n\n", "\t \n"]),
    st.builds(lambda word, n: (word + " ") * n, st.text(min_size=1, max_size=8), st.integers(5_000, 40_000)),
)
# A JSON value where a document's text should be: the right type or a wrong one.
field_values = st.one_of(
    texts,
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
json_lines = st.one_of(
    st.builds(lambda v: json.dumps({"text": v}), field_values),
    st.builds(lambda v: json.dumps({"body": v}), texts),  # wrong field name
    st.builds(json.dumps, st.one_of(st.integers(), st.lists(st.text(max_size=5), max_size=2), st.text(max_size=10))),  # not an object
    st.text(max_size=30),  # not JSON at all (or, by chance, JSON)
    st.just(""),
)


@st.composite
def corpora(draw) -> tuple[str, bytes]:
    """(file suffix, file bytes) of a malformed (or, by chance, fine) corpus."""
    kind = draw(st.sampled_from(["random-bytes", "jsonl", "text", "mixed-encodings"]))
    if kind == "random-bytes":
        return draw(st.sampled_from([".jsonl", ".txt", ".jsonl.zst", ".jsonl.gz", ".parquet"])), draw(st.binary(max_size=300))
    if kind == "jsonl":
        lines = draw(st.lists(json_lines, max_size=12))
        return ".jsonl", "\n".join(lines).encode("utf-8")
    docs = draw(st.lists(texts, max_size=8))
    if kind == "text":
        return ".txt", "\n\n".join(docs).encode("utf-8")
    # Each document in its own encoding, as files glued together from several sources are.
    encodings = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16"])
    parts = [d.encode(draw(encodings), errors="replace") for d in docs]
    return draw(st.sampled_from([".jsonl", ".txt"])), b"\n\n".join(parts)


# Sized for the test suite (well under 30 s together); MFT_FUZZ_EXAMPLES=500 searches longer.
EXAMPLES = int(os.environ.get("MFT_FUZZ_EXAMPLES", "25"))
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# Instruction and chat records: right shapes, wrong types, missing keys, formats mixed in one file.
_contents = st.one_of(st.text(max_size=20), st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2))
_messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": _contents}),
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"])}),
        st.integers(),
        st.text(max_size=5),
    ),
    max_size=5,
)
chat_values = st.one_of(_messages, field_values)
chat_lines = st.one_of(
    st.builds(lambda m: json.dumps({"messages": m}), chat_values),
    st.builds(lambda p, c: json.dumps({"prompt": p, "completion": c}), chat_values, chat_values),
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=10)),
    st.just(""),
)
