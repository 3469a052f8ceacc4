"""Bad data files and full disks: errors that name the option, the file, the line and the field (or the folder that is
full), before any training; and the README's single-text-file fine-tune, which holds out the end of the document."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import small_tmpfs
from reformer_rev.safe_io import FolderLock, WriteError
from reformer_rev.training.datafiles import DataFileError
from training import train_lm, train_translation

PAIR = '{"translation": {"en": "In the beginning", "es": "En el principio"}}\n'

TRANSLATION_CASES = {  # case: (file content (str or bytes), expected message)
    "empty file": ("", r"`--train_file` '.*train.jsonl' is empty: it holds no records. Expected {\"translation\""),
    "only blank lines": ("\n  \n\n", r"is empty: it holds no records"),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"line 1: .*binary file"),
    "not UTF-8": (b'{"translation": {"en": "a", "es": "\xe9t\xe9"}}\n', r"line 1: not UTF-8 text \(byte 0xe9"),
    "tab-separated": ("In the beginning\tEn el principio\n", r"line 1: not JSON \(it looks like tab-separated text\)"),
    "a broken line": (PAIR + PAIR + '{"translation": {"en": "a",\n', r"line 3: not JSON"),
    "no translation column": (PAIR + '{"en": "a", "es": "b"}\n',
                              r"line 2: no field 'translation.en', chosen by `--source_lang en` \(it has \['en', 'es'\]\)"),
    "a pair lacking the target language": (PAIR + '{"translation": {"en": "a", "fr": "b"}}\n',
                                           r"line 2: no field 'translation.es', chosen by `--target_lang es` "
                                           r"\(it has \['en', 'fr'\]\)"),
    "a number instead of text": ('{"translation": {"en": "a", "es": 5}}\n',
                                 r"line 1: field 'translation.es' must be a string, got int \(5\)"),
    "a line that is a list": ('["en", "es"]\n', r"line 1: a JSON list, not an object"),
    "all pairs empty": ('{"translation": {"en": "", "es": " "}}\n' * 3,
                        r"all 3 records have empty translation.en and translation.es: there is nothing to train on"),
    "not gzip": (b"plain text, not gzip", r"cannot be read: (BadGzipFile|OSError)"),
}


@pytest.mark.parametrize("case", list(TRANSLATION_CASES))
def test_bad_translation_file_names_the_file_line_and_field(tmp_path, case):
    content, match = TRANSLATION_CASES[case]
    train = tmp_path / ("train.jsonl.gz" if case == "not gzip" else "train.jsonl")
    (train.write_bytes if isinstance(content, bytes) else train.write_text)(content)
    valid = tmp_path / "valid.jsonl"
    valid.write_text(PAIR)
    with pytest.raises(DataFileError, match=match) as err:
        train_translation.parse_args(["--output_dir", str(tmp_path / "out"), "--train_file", str(train),
                                      "--validation_file", str(valid)])
    print(f"{case}: {err.value}")
    assert str(train) in str(err.value)


@pytest.mark.parametrize("argv, match", [
    (["--train_file", "/nonexistent.jsonl", "--validation_file", "/x.jsonl"], r"`--train_file` '/nonexistent.jsonl' does not exist"),
    (["--train_file", "{pair}"], r"`--train_file` needs a `--validation_file`"),
    (["--train_file", "{txt}", "--validation_file", "{pair}"], r"`--train_file` must be a .json or .jsonl file"),
    (["--source_lang", "en", "--target_lang", "en"], r"`--source_lang` and `--target_lang` are both 'en'"),
])
def test_bad_translation_arguments(tmp_path, argv, match):
    (tmp_path / "pairs.jsonl").write_text(PAIR)
    (tmp_path / "pairs.txt").write_text("text")
    argv = [a.format(pair=tmp_path / "pairs.jsonl", txt=tmp_path / "pairs.txt") for a in argv]
    with pytest.raises(ValueError, match=match):
        train_translation.parse_args(["--output_dir", str(tmp_path / "out"), *argv])


def test_json_array_files_and_gzip_are_checked_too(tmp_path):
    from reformer_rev.training.datafiles import check_json_lines

    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert check_json_lines(good, "train_file", ["text"]) == {"records": 2, "empty": 0}
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps([{"text": "a"}, {"txt": "b"}]))
    with pytest.raises(DataFileError, match=r"record 2: no field 'text'"):
        check_json_lines(bad, "train_file", ["text"])
    zipped = tmp_path / "c.jsonl.gz"
    with gzip.open(zipped, "wt") as fh:
        fh.write('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(DataFileError, match=r"c.jsonl.gz' line 2: field 'text' must be a string"):
        check_json_lines(zipped, "train_file", ["text"])


def test_a_single_text_file_holds_out_its_end_for_validation():
    """The README's fine-tune command with one .txt file: before, "no validation split and fewer than 2 documents"."""
    text = "".join(f"line {i} of the only document\n" for i in range(100))
    train, validation = train_lm.hold_out_end(text, 5)
    assert train + validation == text and train.endswith("\n") and validation.startswith("line ")
    assert 0.04 < len(validation) / len(text) < 0.07


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KB tmpfs when mounting is allowed (root in a container), else skip."""
    with small_tmpfs(tmp_path / "disk", "64k") as mount:
        if mount is None:
            pytest.skip("no permission to mount a small tmpfs")
        yield mount


def fill(folder: Path) -> None:
    """Write into `folder` until its disk is full (its data blocks; a new empty file can still be created)."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        except OSError:
            pass


def test_a_full_disk_under_the_lock_leaves_no_empty_lock_file(full_disk):
    """Before: a raw `OSError: [Errno 28]` and a 0-byte `.lock` left behind."""
    fill(full_disk)
    with pytest.raises(WriteError, match=r"no space left on device while recording the owner in .*\.lock"):
        FolderLock(full_disk, ".lock", purpose="test").acquire()
    assert not (full_disk / ".lock").exists()


def test_a_full_datasets_cache_is_named_as_such(full_disk, tmp_path, monkeypatch):
    """The datasets cache on a full disk: before, a raw Errno 28, or an error blaming "the data files"."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(full_disk / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(full_disk / "cache"))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": "In the beginning " * 20}) + "\n" for _ in range(400)))
    args = train_lm.parse_args(["--train_file", str(train), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(WriteError, match=r"no space left on device while writing the datasets cache \(.*/disk/cache\): "
                                         r"free space there, or set HF_DATASETS_CACHE to a folder on a larger disk"):
        train_lm.load_raw_datasets(args)


def test_translation_progress_counts_pairs(capsys):
    """eval_translation's bar counted batches of 32: a 32-pair run showed 0/1 for its whole duration."""
    from reformer_rev import RevFormerConfig, RevFormerForConditionalGeneration
    from reformer_rev.training.translation import train_joint_tokenizer, translate

    texts = ["In the beginning God created the heaven and the earth.", "En el principio crió Dios los cielos."] * 10
    tokenizer = train_joint_tokenizer(texts, vocab_size=300, min_frequency=1)
    config = RevFormerConfig(vocab_size=len(tokenizer), hidden_size=32, encoder_layers=1, decoder_layers=1,
                             num_attention_heads=2, intermediate_size=64, is_encoder_decoder=True,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id)
    model = RevFormerForConditionalGeneration(config)
    out = translate(model, tokenizer, texts[:5], batch_size=32, num_beams=1, max_new_tokens=2, progress=True)
    assert len(out) == 5
    assert "5/5" in capsys.readouterr().err
