"""Access to the bundled public-domain Bible corpora in ``data/``.

* ``data/bible_lm``: long-document language-modelling corpus, one record per
  whole book per English translation (``text``, ``book``, ``translation``).
* ``data/bible_mt``: verse-aligned English-Spanish pairs in the Hugging Face
  translation format (``translation`` = ``{"en", "es"}``, ``ref``,
  ``en_version``, ``en_kjv``).

Both are split by book into ``train`` / ``validation`` / ``test``.  See
``data/README.md``; regenerate with ``python scripts/build_corpus.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import training.corpus` cheap; datasets is imported lazily
    from datasets import DatasetDict

DATA_DIR: Path = Path(__file__).resolve().parents[1] / "data"
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
