"""Tokenizers for long-sequence language modelling, saved with every checkpoint as a `PreTrainedTokenizerFast`.

* `build_byte_tokenizer()`: the enwik8 convention of long-sequence LMs. Token id `b` *is* byte `b` of the UTF-8 text
  (ids 0-255), followed by four special tokens (`<pad>`=256, `<s>`=257, `</s>`=258, `<unk>`=259), 260 in all, the
  default `vocab_size` of `RevFormerConfig`. Nothing is ever out of vocabulary and bits-per-byte is simply
  `loss / ln 2`.
* `train_bpe_tokenizer()`: a byte-level BPE learnt on the training split with the `tokenizers` library.
* `train_unigram_with_byte_fallback()`: a SentencePiece-style unigram model (`Metaspace` pre-tokenisation, as in
  Marian/OPUS-MT) whose vocabulary also holds the 256 byte tokens `<0x00>`..`<0xFF>`: a character the pieces do not
  cover is spelt in UTF-8 bytes instead of becoming `<unk>`.

Both are built with `tokenizers` (Rust) so that `datasets.map` tokenises whole books quickly, and both decode back to
the exact text. `token_byte_lengths()` gives, per token id, how many UTF-8 bytes it stands for: the denominator of
bits-per-byte for any tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
NUM_BYTES = 256


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (what `ByteLevel` emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(NUM_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(NUM_BYTES + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def wrap_tokenizer(tokenizer: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` as a `PreTrainedTokenizerFast` with the project's four special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_byte_tokenizer(model_max_length: int = int(1e30)) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with id == byte value (0-255) plus the four special tokens (256-259)."""
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(NUM_BYTES)}
    for i, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = NUM_BYTES + i
    # A BPE without merges over the byte alphabet: every byte is one token.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    # use_regex=False: the whole text is one pre-token; nothing is split off or normalised, so ids are the raw bytes.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return wrap_tokenizer(tokenizer, model_max_length)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, model_max_length: int = int(1e30)
) -> PreTrainedTokenizerFast:
    """Learn a byte-level BPE (GPT-2 style pre-tokenisation) on `texts`; the special tokens come first (ids 0-3)."""
    if vocab_size <= NUM_BYTES + len(SPECIAL_TOKENS):
        raise ValueError(
            f"`bpe_vocab_size` must exceed {NUM_BYTES + len(SPECIAL_TOKENS)} (the byte alphabet plus special tokens), "
            f"got {vocab_size}."
        )
    tokenizer = train_byte_level_bpe(_as_iterator(texts), vocab_size, min_frequency, add_prefix_space=False)
    return wrap_tokenizer(tokenizer, model_max_length)


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, add_prefix_space: bool = False
) -> Tokenizer:
    """A raw byte-level BPE (`tokenizers`) learnt on `texts`, special tokens first (ids 0-3), never out of vocabulary."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_unigram_with_byte_fallback(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A raw SentencePiece-style unigram tokenizer (`tokenizers`) learnt on `texts`, special tokens first (ids 0-3),
    then the learnt pieces, then the 256 byte-fallback tokens; `vocab_size` counts all of them."""
    import json

    learnt = vocab_size - NUM_BYTES
    if learnt <= len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"`vocab_size` must exceed {NUM_BYTES + len(SPECIAL_TOKENS) + 1} for a unigram model with byte fallback "
            f"(the 256 byte tokens plus special tokens and pieces), got {vocab_size}."
        )
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=learnt, special_tokens=list(SPECIAL_TOKENS), unk_token=UNK_TOKEN, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer has no byte-fallback switch: add the byte pieces (scored below every learnt piece, so they are only
    # used where nothing else matches) and rebuild the model with `byte_fallback=True`.
    state = json.loads(tokenizer.to_str())
    pieces = state["model"]["vocab"]
    floor = min(score for _, score in pieces[len(SPECIAL_TOKENS) :]) - 10.0
    pieces += [[f"<0x{b:02X}>", floor] for b in range(NUM_BYTES)]
    unigram = models.Unigram([tuple(p) for p in pieces], unk_id=state["model"]["unk_id"], byte_fallback=True)
    tokenizer.model = unigram
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    return tokenizer


def _as_iterator(texts: Iterable[str]) -> Iterator[str]:
    yield from texts


def is_byte_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True if every id below 256 is the byte of the same value (the convention of `build_byte_tokenizer`)."""
    if len(tokenizer) < NUM_BYTES:
        return False
    byte_chars = bytes_to_unicode()
    vocab = tokenizer.get_vocab()
    return all(vocab.get(byte_chars[b]) == b for b in range(NUM_BYTES))


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Number of UTF-8 bytes each token id stands for (the denominator of bits-per-byte).

    Byte-level tokens map back to bytes through `bytes_to_unicode`; other tokens are measured by encoding their text.
    Special tokens (the document separator) count as one byte, like the newline they replace, so for the byte
    tokenizer bits-per-byte is exactly `loss / ln 2`.
    """
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    specials = set(tokenizer.all_special_ids)
    lengths = np.ones(len(tokenizer), dtype=np.int64)
    for token, idx in tokenizer.get_vocab().items():
        if idx in specials or idx >= len(lengths):
            continue
        if all(c in char_to_byte for c in token):
            lengths[idx] = len(token)
        else:
            lengths[idx] = max(1, len(token.encode("utf-8")))
    return lengths


def token_byte_counts(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Matrix `(vocab, 257)`: how often each byte value occurs in each token; column 256 counts special tokens.

    Turns token counts into byte counts, for the unigram byte-frequency baseline over exactly the evaluated tokens.
    """
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    specials = set(tokenizer.all_special_ids)
    counts = np.zeros((len(tokenizer), NUM_BYTES + 1), dtype=np.int64)
    for token, idx in tokenizer.get_vocab().items():
        if idx >= len(counts):
            continue
        if idx in specials:
            counts[idx, NUM_BYTES] = 1
            continue
        if all(c in char_to_byte for c in token):
            data = bytes(char_to_byte[c] for c in token)
        else:
            data = token.encode("utf-8")
        for b in data:
            counts[idx, b] += 1
    return counts


__all__ = [
    "SPECIAL_TOKENS",
    "build_byte_tokenizer",
    "train_bpe_tokenizer",
    "train_unigram_with_byte_fallback",
    "is_byte_tokenizer",
    "token_byte_lengths",
    "token_byte_counts",
    "bytes_to_unicode",
]
