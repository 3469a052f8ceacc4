"""Both training scripts' options come from one table: `--help` shows the defaults the code runs with, every option has
a help text, and an option is added with one row."""

from __future__ import annotations

import argparse
import re

import pytest

from reformer_rev.training.cli import TRAINING_OPTIONS, Option, OptionParser, with_defaults
from training import train_lm, train_translation

SCRIPTS = {"train_lm": (train_lm, []), "train_translation": (train_translation, ["--output_dir", "x"])}


def _help_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the help text argparse prints for it (what the user reads)."""
    return {a.dest: a.help % {} for a in parser._actions if a.dest != "help"}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_shows_the_defaults_the_script_runs_with(script):
    module, required = SCRIPTS[script]
    parser = OptionParser("x", module.OPTIONS)
    args = module.parse_args(required)
    helps = _help_entries(parser)
    assert set(helps) == {o.name for o in module.OPTIONS}
    for option in module.OPTIONS:
        text = helps[option.name]
        assert len(text) > 15, f"--{option.name} has no real help text: {text!r}"
        shown = re.findall(r"\(default: (.*)\)$", text)
        if option.is_flag:
            # A flag shows no "(default: True)": its help says what giving it does.
            assert not shown, text
            assert getattr(args, option.name) is option.default
            if option.default:
                assert text.startswith(f"Sets {option.name} to False"), text
            continue
        if option.default_text is None and option.default is not None:
            value = getattr(args, option.name)
            assert shown and shown[0].split(";")[0] == str(value), (option.name, shown, value)
        # A config doc's "(the default)" describes the config's default; it must not contradict the script's.
        if "RevFormerConfig's default" in text:
            assert "(the default)" not in text and "Defaults to" not in text, text


def test_the_contradictions_of_issue_24_are_gone():
    lm = _help_entries(OptionParser("x", train_lm.OPTIONS))
    args = train_lm.parse_args([])
    assert args.chunk_size_feed_forward == 0 and lm["chunk_size_feed_forward"].endswith(
        "(default: 0; RevFormerConfig's default: None)")
    assert args.loss_chunk_size == 1024 and "(default: 1024;" in lm["loss_chunk_size"]
    assert "default: True" not in lm["reversible"] and args.reversible is True
    assert train_lm.parse_args(["--no_reversible"]).reversible is False
    assert train_lm.parse_args(["--chunk_size_feed_forward", "none"]).chunk_size_feed_forward is None
    mt = _help_entries(OptionParser("x", train_translation.OPTIONS))
    assert mt["tie_word_embeddings"].startswith("Sets tie_word_embeddings to False")
    targs = train_translation.parse_args(["--output_dir", "x"])
    assert targs.tie_word_embeddings is True
    assert train_translation.parse_args(["--output_dir", "x", "--no_tie_word_embeddings"]).tie_word_embeddings is False
    assert "(default: 128)" in mt["per_device_train_batch_size"] and targs.per_device_train_batch_size == 128
    assert "(default: linear)" in mt["lr_scheduler_type"] and targs.lr_scheduler_type == "linear"


@pytest.mark.parametrize("argv, match", [
    (["--time_budget_minutes", "nan"], "`--time_budget_minutes` must be a finite number, got nan"),
    (["--learning_rate", "inf"], "`--learning_rate` must be a finite number"),
    (["--block_size", "0"], "`--block_size` must be a positive integer, got 0"),
    (["--eval_steps", "-1"], "`--eval_steps` must be >= 0, got -1"),
    (["--bpe_vocab_size", "100"], "`--bpe_vocab_size` must be >= 261"),
    (["--validation_split_percentage", "100"], "`--validation_split_percentage` must be below 100"),
])
def test_out_of_range_values_name_the_option(argv, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        train_lm.parse_args(argv)


def test_adding_an_option_is_one_row():
    options = [*TRAINING_OPTIONS, Option("packing", False, "Pack several documents into one block.", group="data")]
    parser = OptionParser("x", options)
    assert parser.parse_args([]).packing is False and parser.parse_args(["--packing"]).packing is True
    with pytest.raises(ValueError, match="no help text"):
        Option("silent", 1, "")
    with pytest.raises(ValueError, match="defined twice"):
        OptionParser("x", [*options, Option("seed", 1, "Another seed option.")])
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['sede'\]"):
        with_defaults(TRAINING_OPTIONS, sede=3)
