#!/usr/bin/env python3
"""Build the bundled public-domain Bible corpora under ``data/``.

Outputs (all gzip level 9, deterministic bytes):

* ``data/bible_lm/{train,validation,test}.jsonl.gz`` -- long-document
  language-modelling corpus: one record per whole book per English
  translation, ``{"text", "book", "translation"}`` with translation
  ``"KJV"`` or ``"WEB"``.
* ``data/bible_mt/{train,validation,test}.jsonl.gz`` -- verse-aligned
  English-Spanish translation corpus in the Hugging Face translation format,
  ``{"translation": {"en", "es"}, "ref", "en_version", "en_kjv"}``.

Both corpora are split *by book* with the same held-out book lists
(``VALIDATION_BOOKS`` / ``TEST_BOOKS`` below), so the same book in either
translation (or near-duplicate wording) never crosses splits.

Sources are the SWORD modules shipped by Debian (all public domain):

    apt-get install -y libsword-utils sword-text-kjv sword-text-web sword-text-sparv

which provide the ``mod2imp`` tool and the modules ``engKJV2006eb`` (King
James Version, 1769 text), ``engWEB2015eb`` (World English Bible) and
``spaRV1909eb`` (Reina-Valera 1909).

Usage::

    python scripts/build_corpus.py            # regenerate data/
    python scripts/build_corpus.py --out DIR  # write somewhere else

Re-running with the same module versions produces byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import html
import io
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data"

APT_HINT = (
    "apt-get update && apt-get install -y "
    "libsword-utils sword-text-kjv sword-text-web sword-text-sparv"
)

# SWORD module names (as in /usr/share/sword/mods.d), keyed by our label.
MODULES: dict[str, str] = {
    "KJV": "engKJV2006eb",
    "WEB": "engWEB2015eb",
    "RV1909": "spaRV1909eb",
}
LM_TRANSLATIONS = ("KJV", "WEB")

# The 66 protocanonical books: (name printed by mod2imp, display name).
# The WEB module also contains the deuterocanon; those books are not used
# because KJV and RV1909 lack them.
BOOKS: list[tuple[str, str]] = [
    ("Genesis", "Genesis"), ("Exodus", "Exodus"), ("Leviticus", "Leviticus"),
    ("Numbers", "Numbers"), ("Deuteronomy", "Deuteronomy"), ("Joshua", "Joshua"),
    ("Judges", "Judges"), ("Ruth", "Ruth"), ("I Samuel", "1 Samuel"),
    ("II Samuel", "2 Samuel"), ("I Kings", "1 Kings"), ("II Kings", "2 Kings"),
    ("I Chronicles", "1 Chronicles"), ("II Chronicles", "2 Chronicles"),
    ("Ezra", "Ezra"), ("Nehemiah", "Nehemiah"), ("Esther", "Esther"),
    ("Job", "Job"), ("Psalms", "Psalms"), ("Proverbs", "Proverbs"),
    ("Ecclesiastes", "Ecclesiastes"), ("Song of Solomon", "Song of Solomon"),
    ("Isaiah", "Isaiah"), ("Jeremiah", "Jeremiah"),
    ("Lamentations", "Lamentations"), ("Ezekiel", "Ezekiel"),
    ("Daniel", "Daniel"), ("Hosea", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"),
    ("Obadiah", "Obadiah"), ("Jonah", "Jonah"), ("Micah", "Micah"),
    ("Nahum", "Nahum"), ("Habakkuk", "Habakkuk"), ("Zephaniah", "Zephaniah"),
    ("Haggai", "Haggai"), ("Zechariah", "Zechariah"), ("Malachi", "Malachi"),
    ("Matthew", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"),
    ("Acts", "Acts"), ("Romans", "Romans"), ("I Corinthians", "1 Corinthians"),
    ("II Corinthians", "2 Corinthians"), ("Galatians", "Galatians"),
    ("Ephesians", "Ephesians"), ("Philippians", "Philippians"),
    ("Colossians", "Colossians"), ("I Thessalonians", "1 Thessalonians"),
    ("II Thessalonians", "2 Thessalonians"), ("I Timothy", "1 Timothy"),
    ("II Timothy", "2 Timothy"), ("Titus", "Titus"), ("Philemon", "Philemon"),
    ("Hebrews", "Hebrews"), ("James", "James"), ("I Peter", "1 Peter"),
    ("II Peter", "2 Peter"), ("I John", "1 John"), ("II John", "2 John"),
    ("III John", "3 John"), ("Jude", "Jude"), ("Revelation of John", "Revelation"),
]
SWORD_TO_DISPLAY = dict(BOOKS)
BOOK_ORDER = [display for _, display in BOOKS]

# Held-out books (display names), shared by the LM and MT corpora.  Each list
# mixes long and short books and genres (narrative, poetry/wisdom, prophecy,
# gospel, epistle) and holds roughly 200k-260k characters per translation.
VALIDATION_BOOKS: list[str] = [
    "Judges", "Ecclesiastes", "Micah", "Mark", "Galatians", "1 John",
]
TEST_BOOKS: list[str] = [
    "1 Kings", "Song of Solomon", "Jonah", "Habakkuk", "John", "Philippians",
]
SPLITS = ("train", "validation", "test")
MAX_FILE_BYTES = 5_000_000  # every bundled file must stay below 5 MB


def split_of(book: str) -> str:
    """Return the split name for a book (display name)."""
    if book in VALIDATION_BOOKS:
        return "validation"
    if book in TEST_BOOKS:
        return "test"
    return "train"


# --------------------------------------------------------------------------
# Reading SWORD modules
# --------------------------------------------------------------------------

Ref = tuple[str, int, int]  # (display book, chapter, verse)

_KEY_RE = re.compile(r"^\$\$\$(.+) (\d+):(\d+)$")


def run_mod2imp(module: str) -> str:
    """Return the raw ``mod2imp`` dump of a SWORD module."""
    exe = shutil.which("mod2imp")
    if exe is None:
        sys.exit(f"error: `mod2imp` not found. Install the SWORD tools and modules:\n  {APT_HINT}")
    proc = subprocess.run(
        [exe, module], capture_output=True, text=True, encoding="utf-8", check=False
    )
    if proc.returncode != 0 or "$$$" not in proc.stdout:
        sys.exit(
            f"error: `mod2imp {module}` failed (rc={proc.returncode}): "
            f"{proc.stderr.strip()[:500]}\n"
            f"Is the module installed? Check /usr/share/sword/mods.d and run:\n  {APT_HINT}"
        )
    return proc.stdout


def parse_imp(dump: str) -> dict[Ref, str]:
    """Parse a mod2imp dump into {(book, chapter, verse): raw OSIS text}.

    Only verses >= 1 of the 66 protocanonical books are kept; verse 0 entries
    (book/chapter intros, prefaces, section titles) and deuterocanonical
    books are dropped.
    """
    verses: dict[Ref, str] = {}
    key: Ref | None = None
    buf: list[str] = []

    def flush() -> None:
        if key is not None:
            verses[key] = "\n".join(buf)

    for line in dump.split("\n"):
        if line.startswith("$$$"):
            flush()
            buf = []
            m = _KEY_RE.match(line)
            key = None
            if m and m.group(1) in SWORD_TO_DISPLAY and int(m.group(3)) >= 1:
                key = (SWORD_TO_DISPLAY[m.group(1)], int(m.group(2)), int(m.group(3)))
        else:
            buf.append(line)
    flush()
    return verses


# --------------------------------------------------------------------------
# Cleaning OSIS markup
# --------------------------------------------------------------------------

# Everything after the end-of-book marker is not part of the book (the WEB
# module appends its glossary to Revelation 22:21 this way).
_BOOK_END_RE = re.compile(r"<div\b[^>]*\beID=\"[^\"]*\"[^>]*\btype=\"book\"[^>]*/>.*", re.S)
# Elements removed together with their content: footnotes/cross references,
# editorial (non-canonical) titles such as the KJV "ALEPH." acrostic headings,
# section headings and Pauline subscriptions, and speaker labels in the WEB
# Song of Solomon ("Beloved", "Lover").
_NOTE_RE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_NONCANON_TITLE_RE = re.compile(r"<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>", re.S)
_SPEAKER_RE = re.compile(r"<speaker\b[^>]*>.*?</speaker>", re.S)
# Structural tags that mark a boundary (paragraph, line, line group, line
# break, canonical title end, chapter, list item): replaced by a space.
_BOUNDARY_TAG_RE = re.compile(
    r"</?(?:div|l|lg|lb|p|chapter|title|item|list|milestone)\b[^>]*>"
)
# Two inline elements glued together with letters on both sides.  Only the
# RV1909 module has these (582 sites): mostly two words that need a space
# (``<w>siempre</w><w>es</w>``), sometimes a verb with an enclitic pronoun
# that is one word (``<w>oyéndo</w><w>lo</w>`` -> "oyéndolo").  They are
# marked with JOIN and resolved by ``resolve_joins``.
JOIN = "\x00"
_GLUED_RE = re.compile(r"(?<=\w)(?:</[a-zA-Z]+>)+(?:<[a-zA-Z]+\b[^>]*>)+(?=\w)")
# Any other tag (w, transChange, divineName, q, seg, foreign, name, ...):
# removed, keeping the text inside.
_ANY_TAG_RE = re.compile(r"<[^>]*>")
# Stray USFM character markers left in the KJV module (the "\nd" before LORD).
_USFM_RE = re.compile(r"\\[a-z]+\*?")
_WS_RE = re.compile(r"[ \t\r\n\f\v]+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r" +([,.;:!?’”)\]])")
_SPACE_AFTER_OPEN_RE = re.compile(r"([(\[“¿¡]) +")


def clean_osis(raw: str) -> str:
    """Strip OSIS markup from one verse and normalise whitespace.

    Notes are removed with their content, non-canonical titles and speaker
    labels are dropped, canonical titles (Psalm superscriptions) are kept as
    text, Strong's-number ``<w lemma=...>`` wrappers are unwrapped, KJV
    paragraph marks (pilcrows), stray USFM markers (``\\nd``) and the single
    bracket pair in the KJV ("[but]", 1 John 2:23) are removed and whitespace
    is collapsed.
    Glued inline elements are left marked with ``JOIN`` (see
    ``resolve_joins``).
    """
    text = _BOOK_END_RE.sub(" ", raw)
    text = _NOTE_RE.sub(" ", text)
    text = _NONCANON_TITLE_RE.sub(" ", text)
    text = _SPEAKER_RE.sub(" ", text)
    text = _BOUNDARY_TAG_RE.sub(" ", text)
    text = _GLUED_RE.sub(JOIN, text)
    text = _ANY_TAG_RE.sub("", text)
    text = html.unescape(text)
    text = _USFM_RE.sub(" ", text)
    text = text.replace("¶", " ").replace("[", "").replace("]", "")
    text = _WS_RE.sub(" ", text).strip()
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
    text = _SPACE_AFTER_OPEN_RE.sub(r"\1", text)
    return text


_WORD_RE = re.compile(r"\w+")
_GLUE_SITE_RE = re.compile(r"(\w+)" + JOIN + r"(\w+)")
ENCLITICS = {"lo", "la", "los", "las", "le", "les", "me", "te", "se", "nos", "os"}
# Accented words that are not verbs (so not hosts of an enclitic).
_NOT_VERBS = {
    "éste", "ésta", "también", "sólo", "cuánto", "josué", "jehová", "ejército", "él", "mí", "así", "más",
}
_ACCENTED = re.compile(r"[áéíóúÁÉÍÓÚ]")


def _is_enclitic_host(word: str) -> bool:
    """Heuristic: could ``word`` be a Spanish verb form carrying an enclitic?
    Infinitives (-r), plural imperatives (-d), gerunds (-ndo), forms with a
    written accent (RV1909 keeps it: "díjole", "oyéndolo") and a few short
    imperatives."""
    w = word.lower()
    if w in _NOT_VERBS:
        return False
    return (
        w.endswith(("r", "d", "ndo"))
        or bool(_ACCENTED.search(w))
        or w in {"haz", "di", "da"}
    )


def resolve_joins(verses: dict[Ref, str]) -> tuple[dict[Ref, str], Counter]:
    """Resolve JOIN marks between two word pieces.

    The pieces are glued into one word when the second is an enclitic pronoun
    and either the first looks like a verb form or the glued form occurs as a
    word elsewhere in the module ("oyéndo|lo" -> "oyéndolo", "vi|lo" ->
    "vilo"); otherwise they are separated by a space ("siempre|es" ->
    "siempre es", "vi|las almas" -> "vi las almas").
    """
    vocab: set[str] = set()
    for text in verses.values():
        vocab.update(w.lower() for w in _WORD_RE.findall(text.replace(JOIN, " ")))
    stats: Counter = Counter()

    def fix(m: re.Match) -> str:
        left, right = m.group(1), m.group(2)
        glued = left + right
        if right.lower() in ENCLITICS and (_is_enclitic_host(left) or glued.lower() in vocab):
            stats["joined"] += 1
            return glued
        stats["spaced"] += 1
        return left + " " + right

    out = {}
    for ref, text in verses.items():
        while JOIN in text:
            new = _GLUE_SITE_RE.sub(fix, text)
            if new == text:  # a mark not between two words
                new = text.replace(JOIN, " ")
            text = new
        out[ref] = _WS_RE.sub(" ", text).strip()
    return out, stats


# RV1909 prints the traditional subscriptions of the Pauline epistles and
# Hebrews as plain text after the final "Amén." of the last verse (the KJV
# module marks them as non-canonical titles, which are dropped).  They are
# removed so the last verse matches the English.
SUBSCRIPTION_BOOKS = BOOK_ORDER[BOOK_ORDER.index("Romans"):BOOK_ORDER.index("Hebrews") + 1]
_SUBSCRIPTION_RE = re.compile(r"(Amén\.)\s+[^.]*\b(?:escrita|enviada)\b.*$", re.I | re.S)


def strip_subscriptions(verses: dict[Ref, str]) -> int:
    """Remove RV1909 epistle subscriptions in place; return how many."""
    n = 0
    for book in SUBSCRIPTION_BOOKS:
        last = max(ref for ref, text in verses.items() if ref[0] == book and text)
        new = _SUBSCRIPTION_RE.sub(r"\1", verses[last])
        if new != verses[last]:
            verses[last] = new
            n += 1
    return n


# RV1909 sets the first word of every chapter in capitals (a printed
# drop-cap convention: "EN el principio", "Y ACONTECIÓ después", "¡OH
# Jehová").  The first all-caps word of verse 1 is re-cased: capitalised at a
# sentence start, lower-cased after a word such as "Y".  Psalm 119:1 keeps
# its acrostic letter "ALEPH.".
_CAPS_WORD_RE = re.compile(r"\b[A-ZÁÉÍÓÚÑÜÂÊÎÔÛ]{2,}\b")
_HEBREW_LETTERS = {"ALEPH"}


def normalise_dropcaps(verses: dict[Ref, str]) -> int:
    """Re-case the all-caps first word of each chapter in place; return count."""
    n = 0
    for ref, text in verses.items():
        if ref[2] != 1:
            continue
        for m in _CAPS_WORD_RE.finditer(text):
            if m.group() in _HEBREW_LETTERS:
                continue
            before = text[: m.start()].rstrip()
            at_start = not before or before[-1] in ".:;!?¡¿("
            word = m.group().capitalize() if at_start else m.group().lower()
            verses[ref] = text[: m.start()] + word + text[m.end():]
            n += 1
            break
    return n


_LEMMA_RE = re.compile(r'lemma="([^"]*)"')
_STRONG_RE = re.compile(r"(?:strong:|(?<=\s))([HG])0*(\d+)")


def strongs_of(raw: str) -> frozenset[str]:
    """Set of Strong's numbers tagged in one verse (outside notes), e.g. {"H430"}."""
    raw = _NOTE_RE.sub(" ", _BOOK_END_RE.sub(" ", raw))
    found: set[str] = set()
    for m in _LEMMA_RE.finditer(raw):
        found.update(h + n for h, n in _STRONG_RE.findall(m.group(1)))
    return frozenset(found)


def load_translation(label: str) -> tuple[dict[Ref, str], dict[Ref, frozenset[str]]]:
    """Return cleaned non-empty verses of one module keyed by reference, and
    the Strong's numbers of each of those verses (used for alignment)."""
    raw = parse_imp(run_mod2imp(MODULES[label]))
    cleaned = {ref: clean_osis(osis) for ref, osis in raw.items()}
    cleaned, stats = resolve_joins(cleaned)
    if stats:
        print(f"{label}: glued inline elements: {dict(stats)}")
    if label == "RV1909":
        print(f"{label}: removed {strip_subscriptions(cleaned)} epistle subscriptions")
        print(f"{label}: re-cased {normalise_dropcaps(cleaned)} chapter-initial capitals")
    texts = {ref: text for ref, text in cleaned.items() if text}
    return texts, {ref: strongs_of(raw[ref]) for ref in texts}


def check_clean(label: str, verses: dict[Ref, str]) -> None:
    """Fail loudly if markup or Strong's numbers survived cleaning."""
    bad = re.compile(r"[<>¶\x00\\\[\]{}|*]|strong:[HG]|lemma|\b[HG]\d{3,5}\b|&[a-z]+;|  | [,.;:!?]|\d")
    for ref, text in verses.items():
        if bad.search(text):
            raise SystemExit(f"error: leftover markup in {label} {ref}: {text[:200]!r}")


# --------------------------------------------------------------------------
# Building records
# --------------------------------------------------------------------------


def book_text(book: str, verses: dict[Ref, str]) -> str:
    """Whole-book text: title line, then chapters separated by a blank line."""
    chapters: dict[int, list[tuple[int, str]]] = {}
    for (b, c, v), text in verses.items():
        if b == book:
            chapters.setdefault(c, []).append((v, text))
    parts = [book]
    for c in sorted(chapters):
        parts.append(" ".join(t for _, t in sorted(chapters[c])))
    return "\n\n".join(parts)


def build_lm(texts: dict[str, dict[Ref, str]]) -> dict[str, list[dict]]:
    """Records for the LM corpus, grouped by split."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for tr in LM_TRANSLATIONS:
        for book in BOOK_ORDER:
            text = book_text(book, texts[tr])
            out[split_of(book)].append({"text": text, "book": book, "translation": tr})
    return out


# --- verse alignment -------------------------------------------------------
# The RV1909 module is stored in KJV versification, but in some chapters the
# Spanish source numbers verses differently (e.g. Spanish Jonah 2:1 is the
# English Jonah 1:17, Spanish Job 39:1-3 are English Job 38:39-41, Spanish
# 2 Samuel 20:25 covers English 20:25-26), so pairing by reference alone
# would misalign whole chapters.  Both the KJV and the RV1909 modules tag
# words with Strong's numbers, so each book is aligned KJV <-> RV1909 with a
# small dynamic programme whose match score is the Jaccard similarity of the
# two verses' Strong's-number sets (typically ~0.8 for the same verse, ~0.05
# for a neighbouring one), with a penalty for pairing different references.
# Only one-to-one matches are kept; merged or unmatched verses are dropped.
# WEB and KJV share references, so the WEB verse at the KJV reference is used
# as the English side.
ALIGN_BAND = 12  # max |index(kjv) - index(es)| considered within a book
W_MATCH = 10.0  # cost of a 1-1 match = W_MATCH * (1 - jaccard)
P_SKIP = 5.0  # leave one verse unmatched
P_MERGE = 6.0  # extra cost of a 2-1 / 1-2 match (such verses are dropped)
P_OFFREF = 4.0  # extra cost of matching two different references
MIN_TAGS = 3  # verses with fewer Strong's numbers count as similarity 0.5
MIN_JACCARD = 0.2  # drop renumbered matches below this Strong's similarity
# WEB follows the Majority Text, RV1909 and KJV the Textus Receptus; where
# the WEB verse is less than half or more than twice the KJV one (e.g. 1 John
# 5:7, Acts 9:6, or Romans 14:23, to which WEB appends the doxology that KJV
# and RV1909 print as Romans 16:25-27) the pair is dropped.
MAX_WEB_KJV_RATIO = 2.0


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two sets (0 when both are empty)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity, or a neutral 0.5 when either verse has too few
    Strong's numbers to judge (a few KJV verses are untagged)."""
    if len(a) < MIN_TAGS or len(b) < MIN_TAGS:
        return 0.5
    return jaccard(a, b)


def align_book(
    src: list[tuple[Ref, frozenset[str]]], tgt: list[tuple[Ref, frozenset[str]]]
) -> list[tuple[int, int, float]]:
    """Align two verse sequences of one book; return (i, j, jaccard) 1-1 matches."""
    n, m = len(src), len(tgt)
    inf = float("inf")
    cost: dict[tuple[int, int], float] = {(0, 0): 0.0}
    back: dict[tuple[int, int], tuple[int, int, str]] = {}
    for i in range(n + 1):
        for j in range(max(0, i - ALIGN_BAND), min(m, i + ALIGN_BAND) + 1):
            here = cost.get((i, j), inf)
            if here == inf:
                continue
            moves = []
            if i < n and j < m:
                c = W_MATCH * (1.0 - similarity(src[i][1], tgt[j][1]))
                c += 0.0 if src[i][0] == tgt[j][0] else P_OFFREF
                moves.append((i + 1, j + 1, c, "11"))
            if i < n:
                moves.append((i + 1, j, P_SKIP, "10"))
            if j < m:
                moves.append((i, j + 1, P_SKIP, "01"))
            if i + 1 < n and j < m:
                c = W_MATCH * (1.0 - similarity(src[i][1] | src[i + 1][1], tgt[j][1]))
                moves.append((i + 2, j + 1, c + P_MERGE, "21"))
            if i < n and j + 1 < m:
                c = W_MATCH * (1.0 - similarity(src[i][1], tgt[j][1] | tgt[j + 1][1]))
                moves.append((i + 1, j + 2, c + P_MERGE, "12"))
            for ni, nj, c, kind in moves:
                if abs(ni - nj) > ALIGN_BAND:
                    continue
                if here + c < cost.get((ni, nj), inf):
                    cost[(ni, nj)] = here + c
                    back[(ni, nj)] = (i, j, kind)
    matches = []
    cell = (n, m)
    while cell != (0, 0):
        i, j, kind = back[cell]
        if kind == "11":
            matches.append((i, j, similarity(src[i][1], tgt[j][1])))
        cell = (i, j)
    return matches[::-1]


def build_mt(
    texts: dict[str, dict[Ref, str]], strongs: dict[str, dict[Ref, frozenset[str]]]
) -> tuple[dict[str, list[dict]], Counter]:
    """Aligned WEB/RV1909 verse pairs (plus the KJV verse), grouped by split.

    ``ref`` is the English (KJV/WEB) reference; ``en_kjv`` is the KJV verse.
    """
    web, kjv, es = texts["WEB"], texts["KJV"], texts["RV1909"]
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    stats: Counter = Counter()
    for book in BOOK_ORDER:
        src = sorted((r, strongs["KJV"][r]) for r in kjv if r[0] == book)
        tgt = sorted((r, strongs["RV1909"][r]) for r in es if r[0] == book)
        stats["kjv_verses"] += len(src)
        stats["es_verses"] += len(tgt)
        for i, j, sim in align_book(src, tgt):
            ref, es_ref = src[i][0], tgt[j][0]
            stats["matched"] += 1
            if ref != es_ref and sim < MIN_JACCARD:
                stats["dropped_renumbered_low_similarity"] += 1
                continue
            if ref not in web:
                stats["dropped_no_web_verse"] += 1
                continue
            ratio = len(web[ref]) / len(kjv[ref])
            if not 1 / MAX_WEB_KJV_RATIO <= ratio <= MAX_WEB_KJV_RATIO:
                stats["dropped_web_kjv_length"] += 1
                continue
            if ref != es_ref:
                stats["pairs_renumbered"] += 1
            _, c, v = ref
            out[split_of(book)].append(
                {
                    "translation": {"en": web[ref], "es": es[es_ref]},
                    "ref": f"{book} {c}:{v}",
                    "en_version": "WEB",
                    "en_kjv": kjv[ref],
                }
            )
            stats["pairs"] += 1
    return out, stats


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """Write records as gzip-9 JSON lines with reproducible bytes (mtime=0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as gz:
        gz.write(payload.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output data directory")
    args = ap.parse_args(argv)

    for b in VALIDATION_BOOKS + TEST_BOOKS:
        assert b in BOOK_ORDER, b
    assert not set(VALIDATION_BOOKS) & set(TEST_BOOKS)

    texts: dict[str, dict[Ref, str]] = {}
    strongs: dict[str, dict[Ref, frozenset[str]]] = {}
    for label in MODULES:
        texts[label], strongs[label] = load_translation(label)
        check_clean(label, texts[label])
        print(f"{label:7s} {MODULES[label]}: {len(texts[label])} non-empty verses")

    lm = build_lm(texts)
    mt, mt_stats = build_mt(texts, strongs)
    print(f"MT: {dict(mt_stats)}")

    limit = MAX_FILE_BYTES
    for name, corpus in (("bible_lm", lm), ("bible_mt", mt)):
        for split in SPLITS:
            path = args.out / name / f"{split}.jsonl.gz"
            write_jsonl_gz(path, corpus[split])
            size = path.stat().st_size
            if name == "bible_lm":
                chars = {
                    tr: sum(len(r["text"]) for r in corpus[split] if r["translation"] == tr)
                    for tr in LM_TRANSLATIONS
                }
            else:
                chars = {
                    "en": sum(len(r["translation"]["en"]) for r in corpus[split]),
                    "es": sum(len(r["translation"]["es"]) for r in corpus[split]),
                }
            print(f"{path}: {len(corpus[split])} records, {size} bytes, chars {chars}")
            if size >= limit:
                raise SystemExit(f"error: {path} is {size} bytes (limit {limit})")


if __name__ == "__main__":
    main()
