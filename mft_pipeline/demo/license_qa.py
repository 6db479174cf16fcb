"""A question-and-answer chat domain built from the license texts (demo/licenses.py): ``messages`` records.

For each license and topic (warranty, liability, redistribution, ...), the first sentence of the
license that mentions the topic answers "What does the NAME license say about TOPIC?", quoted
verbatim. Everything is templated from the text and its front matter, so the records are the same
on every run with the same package version. A sentence already used for the topic (the same
BSD or MIT clause in hundreds of variants) is not used again: without that, most validation
answers would be copies of training answers, and S would measure recall of a few clauses.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

# topic as the question names it -> lowercase stems a sentence about it contains
TOPICS = {
    "warranties": ("warrant",),
    "liability": ("liable", "liability"),
    "redistribution": ("redistribut",),
    "modifications": ("modif",),
    "patents": ("patent",),
    "termination": ("terminat",),
    "copyright notices": ("copyright notice",),
    "fees and payment": ("fee", "royalt", "payment"),
}
# Answers long enough to say something and short enough that a conversation fits a 128-token row.
MIN_CHARS, MAX_CHARS = 40, 280

# A sentence ends at ., ; or : followed by whitespace and an upper-case letter, digit or opening bracket/quote.
_SENTENCE_END = re.compile(r"(?<=[.;:])\s+(?=[A-Z0-9(\"'])")


def sentences(text: str) -> Iterator[str]:
    """The text's sentences in order, whitespace collapsed; paragraphs (blank-line separated) never join."""
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        if flat:
            yield from _SENTENCE_END.split(flat)


def license_qa_records(licenses: Iterable[dict]) -> Iterator[dict]:
    """``{"id", "messages"}`` records from license documents ``{"id", "name", "text"}`` (licenses.license_documents).

    One record per license and topic whose first sentence mentioning the topic is between
    MIN_CHARS and MAX_CHARS long and was not already the answer for that topic. The id is
    ``KEY/TOPIC``.
    """
    used: dict[str, set[str]] = {topic: set() for topic in TOPICS}
    for doc in licenses:
        found = list(sentences(doc["text"]))
        for topic, stems in TOPICS.items():
            answer = next((s for s in found if any(stem in s.lower() for stem in stems)), None)
            if answer is None or not MIN_CHARS <= len(answer) <= MAX_CHARS or answer.lower() in used[topic]:
                continue
            used[topic].add(answer.lower())
            # Many short names end in "License" already ("Zveno Research License").
            label = doc["name"] if doc["name"].lower().endswith("license") else f"{doc['name']} license"
            question = f"What does the {label} say about {topic}?"
            reply = f'The {label} says: "{answer}"'
            yield {
                "id": f"{doc['id']}/{topic.replace(' ', '-')}",
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            }
