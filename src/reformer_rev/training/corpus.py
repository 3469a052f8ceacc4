"""Access to the bundled public-domain Bible corpora in ``data/`` of the source checkout.

* ``data/bible_lm``: long-document language-modelling corpus, one record per
  whole book per English translation (``text``, ``book``, ``translation``).
* ``data/bible_mt``: verse-aligned English-Spanish pairs in the Hugging Face
  translation format (``translation`` = ``{"en", "es"}``, ``ref``,
  ``en_version``, ``en_kjv``).

Both are split by book into ``train`` / ``validation`` / ``test``.  See
``data/README.md``; regenerate with ``python scripts/build_corpus.py``. The files live in the repository, not in the
installed package: they are found next to an editable install (``pip install -e .``), or wherever
``REFORMER_REV_DATA_DIR`` points.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep the import cheap; datasets and torch are imported lazily
    import torch
    from datasets import DatasetDict

# src/reformer_rev/training/corpus.py -> the checkout's root.
DATA_DIR: Path = Path(os.environ.get("REFORMER_REV_DATA_DIR") or Path(__file__).resolve().parents[3] / "data")
LM_DIR: Path = DATA_DIR / "bible_lm"
MT_DIR: Path = DATA_DIR / "bible_mt"
SPLITS: tuple[str, ...] = ("train", "validation", "test")


def _split_files(directory: Path) -> dict[str, str]:
    """Map split name -> path of ``<directory>/<split>.jsonl.gz``."""
    files = {split: directory / f"{split}.jsonl.gz" for split in SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"bundled corpus file(s) missing: {', '.join(missing)}. "
            "They are committed under data/; regenerate them with "
            "`python scripts/build_corpus.py` (needs the Debian packages "
            "libsword-utils sword-text-kjv sword-text-web sword-text-sparv)."
        )
    return {split: str(path) for split, path in files.items()}


def bundled_lm_files() -> dict[str, str]:
    """Split name -> path of the bundled long-document LM corpus files."""
    return _split_files(LM_DIR)


def bundled_translation_files() -> dict[str, str]:
    """Split name -> path of the bundled English-Spanish translation files."""
    return _split_files(MT_DIR)


def load_bundled_lm_dataset() -> DatasetDict:
    """Load the LM corpus as a ``DatasetDict`` (columns: text, book, translation)."""
    import datasets

    return datasets.load_dataset("json", data_files=bundled_lm_files())


def load_bundled_translation_dataset() -> DatasetDict:
    """Load the translation corpus as a ``DatasetDict``
    (columns: translation {en, es}, ref, en_version, en_kjv)."""
    import datasets

    return datasets.load_dataset("json", data_files=bundled_translation_files())


DOCUMENT_SEPARATOR = "\n\n"


def load_corpus_bytes(split: str) -> torch.Tensor:
    """One split of the LM corpus as a single byte stream (int64 tensor, id = UTF-8 byte, the byte tokenizer's
    convention), documents in file order joined by a blank line. The benchmarks that train on raw bytes all read
    this one stream."""
    import torch

    with gzip.open(bundled_lm_files()[split], "rt", encoding="utf-8") as fh:
        text = DOCUMENT_SEPARATOR.join(json.loads(line)["text"] for line in fh)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
