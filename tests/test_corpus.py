"""Checks on the bundled Bible corpora in data/ (built by scripts/build_corpus.py)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from reformer_rev.training import corpus

SPLITS = ("train", "validation", "test")
MAX_BYTES = 5_000_000
# Leftover OSIS/USFM markup, Strong's numbers, entities, pilcrows, doubled spaces.
MARKUP_RE = re.compile(
    r"[<>¶\\{}\[\]\x00]|strong:[HG]|lemma=|\b[HG]\d{3,5}\b|&[a-z]+;|&#\d+;|  |\bosisID\b|\bsID\b"
)


def _read(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def lm() -> dict[str, list[dict]]:
    return {split: _read(path) for split, path in corpus.bundled_lm_files().items()}


@pytest.fixture(scope="module")
def mt() -> dict[str, list[dict]]:
    return {split: _read(path) for split, path in corpus.bundled_translation_files().items()}


def _mt_book(record: dict) -> str:
    return record["ref"].rsplit(" ", 1)[0]


def test_files_exist_and_are_small() -> None:
    for files in (corpus.bundled_lm_files(), corpus.bundled_translation_files()):
        assert set(files) == set(SPLITS)
        for path in files.values():
            p = Path(path)
            assert p.is_file() and p.suffixes[-2:] == [".jsonl", ".gz"]
            assert p.resolve().is_relative_to(corpus.DATA_DIR)
            assert 0 < p.stat().st_size < MAX_BYTES, path


def test_missing_files_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "LM_DIR", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="build_corpus"):
        corpus.bundled_lm_files()


def test_lm_schema_and_sizes(lm: dict[str, list[dict]]) -> None:
    assert sum(len(v) for v in lm.values()) == 2 * 66
    for split, records in lm.items():
        for r in records:
            assert set(r) == {"text", "book", "translation"}
            assert r["translation"] in {"KJV", "WEB"}
            assert r["text"].startswith(r["book"] + "\n\n")
            assert len(r["text"]) > 1000
        # every book appears once per translation
        for tr in ("KJV", "WEB"):
            books = [r["book"] for r in records if r["translation"] == tr]
            assert len(books) == len(set(books))
            assert sorted(books) == sorted(r["book"] for r in records if r["translation"] == "KJV")
        if split != "train":
            for tr in ("KJV", "WEB"):
                chars = sum(len(r["text"]) for r in records if r["translation"] == tr)
                assert 150_000 <= chars <= 300_000, (split, tr, chars)
    assert len(lm["validation"]) >= 8 and len(lm["test"]) >= 8


def test_splits_disjoint_by_book(lm: dict[str, list[dict]], mt: dict[str, list[dict]]) -> None:
    lm_books = {s: {r["book"] for r in recs} for s, recs in lm.items()}
    mt_books = {s: {_mt_book(r) for r in recs} for s, recs in mt.items()}
    for books in (lm_books, mt_books):
        for a in SPLITS:
            for b in SPLITS:
                if a < b:
                    assert not books[a] & books[b], (a, b, books[a] & books[b])
    # the MT corpus holds out the same books as the LM corpus
    for s in SPLITS:
        assert mt_books[s] == lm_books[s], s


def test_no_leftover_markup(lm: dict[str, list[dict]], mt: dict[str, list[dict]]) -> None:
    for records in lm.values():
        for r in records:
            m = MARKUP_RE.search(r["text"])
            assert m is None, (r["book"], r["translation"], r["text"][max(0, m.start() - 60) : m.end() + 60])
            assert "\n\n\n" not in r["text"]
    for records in mt.values():
        for r in records[::7]:
            for text in (r["translation"]["en"], r["translation"]["es"], r["en_kjv"]):
                assert MARKUP_RE.search(text) is None, (r["ref"], text)
                assert text == text.strip() and "\n" not in text


def test_translation_records(mt: dict[str, list[dict]]) -> None:
    ref_re = re.compile(r"^[1-3]? ?[A-Z][A-Za-z ]+ \d+:\d+$")
    seen: set[str] = set()
    for records in mt.values():
        for r in records:
            assert set(r) == {"translation", "ref", "en_version", "en_kjv"}
            assert set(r["translation"]) == {"en", "es"}
            assert r["translation"]["en"].strip() and r["translation"]["es"].strip()
            assert r["en_kjv"].strip()
            assert r["en_version"] == "WEB"
            assert ref_re.match(r["ref"]), r["ref"]
            assert r["ref"] not in seen
            seen.add(r["ref"])


def test_translation_pair_counts(mt: dict[str, list[dict]]) -> None:
    total = sum(len(v) for v in mt.values())
    assert 30_000 <= total <= 31_102, total
    assert len(mt["validation"]) >= 1000 and len(mt["test"]) >= 1000
    for split in ("validation", "test"):
        chars = sum(len(r["translation"]["en"]) for r in mt[split])
        assert chars >= 150_000, (split, chars)


def test_known_verses(mt: dict[str, list[dict]]) -> None:
    by_ref = {r["ref"]: r for records in mt.values() for r in records}
    gen = by_ref["Genesis 1:1"]
    assert gen["translation"]["es"] == "En el principio crió Dios los cielos y la tierra."
    assert gen["en_kjv"] == "In the beginning God created the heaven and the earth."
    assert gen["translation"]["en"].startswith("In the beginning, God created")
    # Spanish Jonah 2:1 is English Jonah 1:17: pairs follow the English numbering.
    jonah = by_ref["Jonah 1:17"]
    assert "pez" in jonah["translation"]["es"] and "fish" in jonah["translation"]["en"]
    # Spanish colophons after the last verse of Paul's letters are stripped.
    assert by_ref["Philemon 1:25"]["translation"]["es"].endswith("Amén.")
    for r in by_ref.values():
        assert "fué escrita de" not in r["translation"]["es"].lower()


def test_load_with_datasets() -> None:
    pytest.importorskip("datasets")
    lm = corpus.load_bundled_lm_dataset()
    mt = corpus.load_bundled_translation_dataset()
    assert set(lm) == set(SPLITS) and set(mt) == set(SPLITS)
    assert lm["validation"].column_names == ["text", "book", "translation"]
    assert mt["test"][0]["translation"]["es"]
    assert mt["train"].num_rows > 25_000
