"""Fuzz the models' public surface with bad and edge-case inputs and classify what each one does.

Every case calls real entry points (`forward` in eval and in training mode, `generate()`, `RevFormerConfig(...)`) of
both model classes, `RevFormerForCausalLM` and `RevFormerForConditionalGeneration`, and lands in one class:

* `clear`:  a `ValueError`/`TypeError` whose message names the offending argument (what a user can act on);
* `opaque`: any other exception (an `IndexError` from inside torch, a `RuntimeError` about matrix shapes, an
  `AttributeError`, or a ValueError/TypeError that does not name the argument);
* `silent`: accepted although the input is invalid, or accepted and converted but the result differs from the
  result of the equivalent valid input (e.g. uint8 ids must give the int64 ids' logits), or non-finite;
* `valid`:  accepted and correct (valid inputs, or harmless ones such as int32 ids, converted correctly);
* `refused`: a valid input that raised (a false alarm; listed separately so it cannot hide among the errors).

Each exception also records where it was raised (`reformer_rev`, `transformers`, `torch`, `other`: the innermost
frame). Counts are printed as a table; the per-case results go to `<output_dir>/fuzz_results.json`.

Beyond the models' inputs, three suites feed the training scripts and the loader bad *files* (`FileHarness`):

* `data`: local data files of `training/train_lm.py` and `training/train_translation.py` (empty, binary, not UTF-8,
  tab-separated, a broken line, a missing column or language key, non-text values, all-empty records), run through
  the scripts' own argument parsing and data loading; clear = the error names the option, the file and where in it;
* `config`: a saved model folder whose `config.json` or weights were damaged, loaded with `from_pretrained`; clear =
  the error names the field or the file; a config with fewer layers than its weights must *warn* with the count;
* `resume`: a real checkpoint, damaged (manifest, RNG, optimizer, scheduler, trainer state) or resumed with other
  settings or another process count, given to `--resume_from_checkpoint`; clear = the error names the file (or the
  setting) and nothing was trained.

    python -m eval.fuzz_inputs                          # every suite (~700 cases, a few minutes on 2 cores)
    python -m eval.fuzz_inputs --suites models          # only the models' inputs (~600 cases, about a minute)
    python -m eval.fuzz_inputs --output_dir DIR         # default: outputs/fuzz (scratch, git-ignored)

Run it from the repository root (the file suites import the scripts in `training/`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reformer_rev import RevFormerConfig, RevFormerForCausalLM, RevFormerForConditionalGeneration

VOCAB, HIDDEN, MAX_POS, BATCH, SEQ = 48, 32, 64, 2, 8
CATEGORIES = ("clear", "opaque", "silent", "valid", "refused")

# What an input is expected to do: "error" (invalid: must be refused), "valid" (must work), "convert" (harmless
# variant of a valid input: may be refused clearly, or accepted with the same result as the valid input), "warn"
# (accepted, with a logged warning that names the problem).
ERROR, VALID, CONVERT, WARN = "error", "valid", "convert", "warn"
SUITES = ("models", "data", "config", "resume")


@dataclass
class Case:
    target: str  # e.g. "causal.forward.eval", "seq2seq.generate", "config"
    argument: str  # the argument a clear error must name
    description: str
    expect: str
    run: Callable[[], Any]  # returns the output to check (a tensor), raises for refused inputs
    reference: Callable[[], Any] | None = None  # the equivalent valid input's output (CONVERT cases)
    names: tuple[str, ...] = field(default=())  # other names that count as naming the argument
    # File cases: every one of these must appear in the message (e.g. the file and "line 3"), and errors of these
    # types count as clear (a damaged file is an OSError as much as a ValueError).
    must_name: tuple[str, ...] = field(default=())
    clear_types: tuple[type, ...] = (ValueError, TypeError)
    timeout: float | None = None  # seconds; a case still running then hangs (classified opaque)


class CaseTimeout(Exception):
    """A case ran longer than its limit: the entry point hung (e.g. an endless loop over a bad data position)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"still running after {seconds:g} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _WarningCatcher(logging.Handler):
    """Collects the WARNING records logged (by any library) while a case runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _WarningCatcher:
        root = logging.getLogger()
        self._level = root.level
        root.addHandler(self)
        root.setLevel(min(root.level, logging.WARNING) if root.level else logging.WARNING)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)


def _origin(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    path = frames[-1].filename if frames else ""
    for name in ("reformer_rev", "transformers", "torch"):
        if f"/{name}/" in path:
            return name
    return "other"


def _finite(out: Any) -> bool:
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _same(a: Any, b: Any) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5, equal_nan=False))
    return bool(torch.equal(a, b))


def classify(case: Case) -> dict[str, Any]:
    record = {"target": case.target, "argument": case.argument, "description": case.description,
              "expect": case.expect}
    warnings = _WarningCatcher()
    try:
        with warnings, _time_limit(case.timeout):
            out = case.run()
    except Exception as err:  # noqa: BLE001 - classifying every failure is the point
        message = f"{type(err).__name__}: {err}"
        record.update(error=message[:600], raised_in=_origin(err))
        names = (case.argument, *case.names)
        clear = (isinstance(err, case.clear_types) and any(n in str(err) for n in names)
                 and all(n in str(err) for n in case.must_name))
        if isinstance(err, CaseTimeout):  # accepted, then never finished: nothing told the user anything
            record.update(category="refused" if case.expect == VALID else "silent", problem=str(err))
        elif case.expect == VALID:
            record["category"] = "refused"
        else:
            record["category"] = "clear" if clear else "opaque"
        return record
    if case.expect == WARN:
        said = [m for m in warnings.messages if any(n in m for n in (case.argument, *case.names))
                and all(n in m for n in case.must_name)]
        record.update(category="clear" if said else "silent", warning=(said or [None])[0])
        if not said:
            record["problem"] = "accepted without a warning naming the problem"
    elif case.expect == ERROR:
        record.update(category="silent", problem="invalid input accepted")
    elif not _finite(out):
        record.update(category="silent", problem="non-finite output")
    elif case.reference is not None and not _same(out, case.reference()):
        record.update(category="silent", problem="accepted, but the result differs from the equivalent valid input")
    else:
        record["category"] = "valid"
    return record


# --------------------------------------------------------------------------------------------------------------
# The models and canonical valid inputs
# --------------------------------------------------------------------------------------------------------------


def causal_config(**overrides) -> RevFormerConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=MAX_POS, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return RevFormerConfig(**{**kw, **overrides})


def seq2seq_config(**overrides) -> RevFormerConfig:
    kw = dict(encoder_layers=2, decoder_layers=2, is_encoder_decoder=True, decoder_start_token_id=1)
    return causal_config(**{**kw, **overrides})


def ids(shape=(BATCH, SEQ), seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def left_padded_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :3] = 0
    return mask


class Harness:
    """Builds the cases. `models[kind]` is a float32 model; forward cases run it in eval (no grad) and train mode."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.models = {"causal": RevFormerForCausalLM(causal_config()),
                       "seq2seq": RevFormerForConditionalGeneration(seq2seq_config())}
        self.cases: list[Case] = []

    # ---- calling conventions ----------------------------------------------------------------------------------

    def forward(self, kind: str, mode: str, kwargs: dict[str, Any]) -> torch.Tensor:
        """Run forward; in training mode also backward when there is a loss. Returns the loss or the logits."""
        model = self.models[kind].train(mode == "train")
        model.zero_grad(set_to_none=True)
        if mode == "eval":
            with torch.no_grad():
                out = model(**kwargs)
        else:
            out = model(**kwargs)
        result = out[0] if isinstance(out, tuple) else (out.loss if out.loss is not None else out.logits)
        if mode == "train" and result.requires_grad:
            (result if result.dim() == 0 else result.float().mean()).backward()
        return result.detach()

    def generate(self, kind: str, kwargs: dict[str, Any]) -> torch.Tensor:
        model = self.models[kind].eval()
        kwargs = {"max_new_tokens": 4, "do_sample": False, **kwargs}
        with torch.no_grad():
            out = model.generate(**kwargs)
        return out if isinstance(out, torch.Tensor) else out.sequences

    # ---- case builders ----------------------------------------------------------------------------------------

    def add_forward(self, kind, argument, description, expect, kwargs, reference_kwargs=None, names=()):
        for mode in ("eval", "train"):
            ref = None
            if reference_kwargs is not None:
                ref = (lambda m=mode, r=reference_kwargs: self.forward(kind, m, r))
            self.cases.append(Case(f"{kind}.forward.{mode}", argument, description, expect,
                                   lambda m=mode, k=kwargs: self.forward(kind, m, k), ref, tuple(names)))

    def add_generate(self, kind, argument, description, expect, kwargs, reference_kwargs=None, names=()):
        ref = None if reference_kwargs is None else (lambda r=reference_kwargs: self.generate(kind, r))
        self.cases.append(Case(f"{kind}.generate", argument, description, expect,
                               lambda k=kwargs: self.generate(kind, k), ref, tuple(names)))

    def build(self) -> list[Case]:
        for kind in ("causal", "seq2seq"):
            self.token_cases(kind)
            self.mask_cases(kind)
            self.label_cases(kind)
            self.embedding_cases(kind)
            self.misc_forward_cases(kind)
            self.generate_cases(kind)
        self.causal_only_cases()
        self.seq2seq_only_cases()
        self.config_cases()
        return self.cases

    def base(self, kind: str) -> dict[str, Any]:
        """A valid call: ids (and decoder ids for the encoder-decoder)."""
        kw = {"input_ids": ids()}
        if kind == "seq2seq":
            kw["decoder_input_ids"] = ids((BATCH, 5), seed=1)
        return kw

    def token_cases(self, kind: str) -> None:
        names = ["input_ids"] + (["decoder_input_ids"] if kind == "seq2seq" else [])
        for name in names:
            shape = tuple(self.base(kind)[name].shape)
            good = self.base(kind)[name]

            def with_(value, _name=name):
                return {**self.base(kind), _name: value}

            for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
                self.add_forward(kind, name, f"{name} dtype {dtype}", CONVERT, with_(good.to(dtype)), self.base(kind))
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bool, torch.complex64):
                self.add_forward(kind, name, f"{name} dtype {dtype}", ERROR, with_(good.to(dtype)))
            for bad in (-1, -100, VOCAB, VOCAB + 7, 2**40):
                value = good.clone()
                value[0, 1] = bad
                self.add_forward(kind, name, f"{name} contains {bad}", ERROR, with_(value))
            self.add_forward(kind, name, f"{name} 1-D", ERROR, with_(good[0]))
            self.add_forward(kind, name, f"{name} 3-D", ERROR, with_(good[None]))
            self.add_forward(kind, name, f"{name} 0-D", ERROR, with_(good[0, 0]))
            self.add_forward(kind, name, f"{name} empty batch", ERROR, with_(good[:0]))
            self.add_forward(kind, name, f"{name} empty sequence", ERROR, with_(good[:, :0]))
            self.add_forward(kind, name, f"{name} longer than max_position_embeddings", ERROR,
                             with_(ids((BATCH, MAX_POS + 3))), names=("max_position_embeddings",))
            self.add_forward(kind, name, f"{name} as a python list", CONVERT, with_(good.tolist()), self.base(kind))
            self.add_forward(kind, name, f"{name} as a numpy array", CONVERT, with_(good.numpy()), self.base(kind))
            self.add_forward(kind, name, f"{name} ragged list", ERROR, with_([[3, 4, 5], [3, 4]]))
            self.add_forward(kind, name, f"{name} as a string", ERROR, with_("hello"))
            self.add_forward(kind, name, f"{name} non-contiguous", VALID, with_(ids(shape[:1] + (2 * shape[1],))[:, ::2]))
            if shape[0] == BATCH:
                # The causal LM's base call has no other input: give it an attention mask of the base batch.
                other = {} if kind == "seq2seq" else {"attention_mask": torch.ones(shape, dtype=torch.long)}
                self.add_forward(kind, name, f"{name} batch differs from the other inputs", ERROR,
                                 {**with_(ids((BATCH + 1, shape[1]))), **other}, names=tuple(other))

    def mask_cases(self, kind: str) -> None:
        names = ["attention_mask"] + (["decoder_attention_mask"] if kind == "seq2seq" else [])
        for name in names:
            length = SEQ if name == "attention_mask" else 5
            ones = torch.ones(BATCH, length, dtype=torch.long)
            padded = ones.clone()
            padded[1, :2] = 0

            def with_(value, _name=name):
                return {**self.base(kind), _name: value}

            self.add_forward(kind, name, f"{name} all ones", VALID, with_(ones))
            self.add_forward(kind, name, f"{name} left padding", VALID, with_(padded))
            right = ones.clone()
            right[0, -2:] = 0
            self.add_forward(kind, name, f"{name} right padding", VALID, with_(right))
            for dtype in (torch.bool, torch.int32, torch.uint8, torch.float32, torch.float64):
                self.add_forward(kind, name, f"{name} dtype {dtype}", CONVERT, with_(padded.to(dtype)), with_(padded))
            self.add_forward(kind, name, f"{name} as a python list", CONVERT, with_(padded.tolist()), with_(padded))
            for bad, label in ((2, "value 2"), (-1, "value -1"), (float("nan"), "NaN"), (0.5, "value 0.5"),
                               (float("inf"), "inf")):
                value = padded.to(torch.float32 if isinstance(bad, float) else torch.long).clone()
                value[0, 1] = bad
                self.add_forward(kind, name, f"{name} {label}", ERROR, with_(value))
            self.add_forward(kind, name, f"{name} too long", ERROR, with_(torch.ones(BATCH, length + 1, dtype=torch.long)))
            self.add_forward(kind, name, f"{name} too short", ERROR, with_(torch.ones(BATCH, length - 1, dtype=torch.long)))
            self.add_forward(kind, name, f"{name} wrong batch", ERROR, with_(torch.ones(BATCH + 1, length, dtype=torch.long)))
            self.add_forward(kind, name, f"{name} 1-D", ERROR, with_(torch.ones(length, dtype=torch.long)))
            self.add_forward(kind, name, f"{name} 3-D", ERROR, with_(torch.ones(BATCH, 1, length, dtype=torch.long)))
            self.add_forward(kind, name, f"{name} 4-D float additive mask", ERROR,
                             with_(torch.zeros(BATCH, 1, length, length)))
            self.add_forward(kind, name, f"{name} a whole row masked (a row of padding only)", VALID,
                             with_(torch.cat([ones[:1], torch.zeros(1, length, dtype=torch.long)])))

    def label_cases(self, kind: str) -> None:
        length = SEQ if kind == "causal" else 5
        good = ids((BATCH, length), seed=2)
        base = self.base(kind)
        if kind == "seq2seq":  # labels alone: the decoder inputs are derived from them
            base = {"input_ids": base["input_ids"]}

        def with_(value):
            return {**base, "labels": value}

        ignored = good.clone()
        ignored[0, :2] = -100
        self.add_forward(kind, "labels", "labels", VALID, with_(good))
        self.add_forward(kind, "labels", "labels with -100", VALID, with_(ignored))
        self.add_forward(kind, "labels", "labels all -100", VALID, with_(torch.full_like(good, -100)))
        for dtype in (torch.int32, torch.int16, torch.uint8):
            self.add_forward(kind, "labels", f"labels dtype {dtype}", CONVERT, with_(good.to(dtype)), with_(good))
        for dtype in (torch.float32, torch.float64, torch.bool):
            self.add_forward(kind, "labels", f"labels dtype {dtype}", ERROR, with_(good.to(dtype)))
        for bad in (-1, -2, -101, VOCAB, VOCAB + 5):
            value = good.clone()
            value[1, 3] = bad
            self.add_forward(kind, "labels", f"labels contain {bad}", ERROR, with_(value))
        self.add_forward(kind, "labels", "labels as a python list", CONVERT, with_(good.tolist()), with_(good))
        if kind == "causal":
            for shape, label in (((BATCH, length - 1), "too short"), ((BATCH, length + 1), "too long"),
                                 ((BATCH + 1, length), "wrong batch")):
                self.add_forward(kind, "labels", f"labels {label}", ERROR, with_(ids(shape, seed=3)))
        else:  # a target length of its own is valid; a batch of its own is not
            self.add_forward(kind, "labels", "labels wrong batch", ERROR, with_(ids((BATCH + 1, length), seed=3)))
            self.add_forward(kind, "labels", "labels with decoder_input_ids of another length", ERROR,
                             {**self.base(kind), "labels": ids((BATCH, 7), seed=3)}, names=("decoder_input_ids",))
        self.add_forward(kind, "labels", "labels 1-D", ERROR, with_(good[0]))
        self.add_forward(kind, "labels", "labels 3-D", ERROR, with_(good[None]))

    def embedding_cases(self, kind: str) -> None:
        model = self.models[kind]
        name = "inputs_embeds"
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids())
        rest = {k: v for k, v in self.base(kind).items() if k != "input_ids"}

        def with_(value, **extra):
            return {**rest, name: value, **extra}

        self.add_forward(kind, name, "inputs_embeds", VALID, with_(embeds))
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            self.add_forward(kind, name, f"inputs_embeds dtype {dtype} (model float32)", CONVERT,
                             with_(embeds.to(dtype)), with_(embeds.to(dtype).float()))
        for dtype in (torch.int64, torch.int32, torch.bool):
            self.add_forward(kind, name, f"inputs_embeds dtype {dtype}", ERROR, with_(embeds.round().to(dtype)))
        self.add_forward(kind, name, "inputs_embeds wrong hidden size", ERROR, with_(torch.randn(BATCH, SEQ, HIDDEN + 1)))
        self.add_forward(kind, name, "inputs_embeds 2-D", ERROR, with_(embeds[0]))
        self.add_forward(kind, name, "inputs_embeds 4-D", ERROR, with_(embeds[None]))
        self.add_forward(kind, name, "inputs_embeds empty sequence", ERROR, with_(embeds[:, :0]))
        self.add_forward(kind, name, "inputs_embeds as a python list", ERROR, with_(embeds.tolist()))
        self.add_forward(kind, name, "both input_ids and inputs_embeds", ERROR, with_(embeds, input_ids=ids()),
                         names=("input_ids",))
        self.add_forward(kind, "input_ids", "neither input_ids nor inputs_embeds", ERROR, rest, names=("inputs_embeds",))

    def misc_forward_cases(self, kind: str) -> None:
        base = self.base(kind)
        cache_name = "past_key_values"
        for value, label in (((torch.zeros(1),), "a tuple of tensors"), ("cache", "a string"), ([1, 2], "a list"),
                             (3, "an int")):
            self.add_forward(kind, cache_name, f"past_key_values {label}", ERROR, {**base, cache_name: value},
                             names=("cache",))
            self.add_forward(kind, "cache", f"cache= {label}", ERROR, {**base, "cache": value},
                             names=("past_key_values",))
        for typo in ("attention_masks", "input_id", "label", "position_id"):
            self.add_forward(kind, typo, f"unknown keyword {typo}=", ERROR, {**base, typo: ids()})
        self.add_forward(kind, "return_dict", "return_dict=False", VALID, {**base, "return_dict": False})
        for value in (-1, 1.5, "2"):
            self.add_forward(kind, "logits_to_keep", f"logits_to_keep={value!r}", ERROR, {**base, "logits_to_keep": value})
        self.add_forward(kind, "logits_to_keep", "logits_to_keep=1", VALID, {**base, "logits_to_keep": 1})

    def causal_only_cases(self) -> None:
        base = self.base("causal")
        name = "position_ids"
        good = torch.arange(SEQ).expand(BATCH, SEQ)
        self.add_forward("causal", name, "position_ids", VALID, {**base, name: good})
        self.add_forward("causal", name, "position_ids broadcast (1, seq)", CONVERT, {**base, name: good[:1]},
                         {**base, name: good})
        self.add_forward("causal", name, "position_ids 1-D", CONVERT, {**base, name: good[0]}, {**base, name: good})
        self.add_forward("causal", name, "position_ids int32", CONVERT, {**base, name: good.int()}, {**base, name: good})
        for value, label in ((good - 1, "negative"), (good + MAX_POS, ">= max_position_embeddings"),
                             (good.float(), "float"), (torch.arange(SEQ + 1).expand(BATCH, -1), "too long"),
                             (good[None], "3-D")):
            self.add_forward("causal", name, f"position_ids {label}", ERROR, {**base, name: value},
                             names=("max_position_embeddings",))
        for value in (0, -1, 2.5, "2"):
            self.add_forward("causal", "num_hidden_layers", f"num_hidden_layers={value!r}", ERROR,
                             {**base, "num_hidden_layers": value})
        self.add_forward("causal", "num_hidden_layers", "num_hidden_layers=1", VALID, {**base, "num_hidden_layers": 1})

    def seq2seq_only_cases(self) -> None:
        model = self.models["seq2seq"]
        base = self.base("seq2seq")
        with torch.no_grad():
            enc = model.get_encoder()(input_ids=base["input_ids"])
        dec = {"decoder_input_ids": base["decoder_input_ids"]}
        name = "encoder_outputs"
        self.add_forward("seq2seq", name, "encoder_outputs", VALID, {**dec, name: enc})
        self.add_forward("seq2seq", name, "encoder_outputs as a tuple", CONVERT, {**dec, name: (enc.last_hidden_state,)},
                         {**dec, name: enc})
        self.add_forward("seq2seq", name, "encoder_outputs as a bare tensor", CONVERT,
                         {**dec, name: enc.last_hidden_state}, {**dec, name: enc})
        for value, label in ((torch.randn(BATCH, SEQ, HIDDEN + 2), "wrong hidden size"),
                             (torch.randn(BATCH + 1, SEQ, HIDDEN), "wrong batch"), ("enc", "a string"),
                             (torch.randn(SEQ, HIDDEN), "2-D")):
            self.add_forward("seq2seq", name, f"encoder_outputs {label}", ERROR, {**dec, name: value})
        self.add_forward("seq2seq", name, "encoder_outputs and an attention_mask of another length", ERROR,
                         {**dec, name: enc, "attention_mask": torch.ones(BATCH, SEQ + 2, dtype=torch.long)},
                         names=("attention_mask",))
        self.add_forward("seq2seq", "decoder_input_ids", "neither decoder_input_ids nor labels", ERROR,
                         {"input_ids": base["input_ids"]}, names=("labels", "decoder_inputs_embeds"))

    def generate_cases(self, kind: str) -> None:
        prompt = ids((BATCH, 5), seed=4)
        base = {"input_ids": prompt}
        mask = torch.ones_like(prompt)
        mask[1, :2] = 0
        self.add_generate(kind, "input_ids", "greedy", VALID, base)
        self.add_generate(kind, "attention_mask", "left-padded batch", VALID, {**base, "attention_mask": mask})
        self.add_generate(kind, "num_beams", "beam search", VALID, {**base, "num_beams": 2})
        self.add_generate(kind, "do_sample", "sampling", VALID, {**base, "do_sample": True, "top_k": 5})
        generation_args = [
            ("max_new_tokens", 0), ("max_new_tokens", -1), ("max_new_tokens", 1.5), ("max_new_tokens", "3"),
            ("max_new_tokens", MAX_POS + 10), ("min_new_tokens", -1), ("max_length", 2),
            ("num_beams", 0), ("num_beams", -1), ("num_beams", 2.5), ("num_return_sequences", 0),
            ("num_return_sequences", 3), ("temperature", 0.0), ("temperature", -1.0), ("top_k", -1),
            ("top_p", 1.5), ("top_p", -0.1), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
            ("no_repeat_ngram_size", -1), ("pad_token_id", VOCAB), ("pad_token_id", -5), ("eos_token_id", VOCAB),
            ("eos_token_id", -3), ("bos_token_id", VOCAB + 1), ("generation_config", "greedy"),
            ("logits_processor", "none"), ("assistant_model", "self"), ("stopping_criteria", 5),
        ]
        if kind == "seq2seq":
            generation_args += [("decoder_start_token_id", VOCAB), ("decoder_start_token_id", -1)]
        for name, value in generation_args:
            extra = {"do_sample": True} if name in ("temperature", "top_k", "top_p") else {}
            # Running out of positions may be reported in terms of the limit rather than of the request.
            names = ("max_position_embeddings",) if name == "max_new_tokens" else ()
            self.add_generate(kind, name, f"{name}={value!r}", ERROR, {**base, **extra, name: value}, names=names)
        for bad in (-1, VOCAB):
            value = prompt.clone()
            value[0, 0] = bad
            self.add_generate(kind, "input_ids", f"prompt contains {bad}", ERROR, {"input_ids": value})
        self.add_generate(kind, "input_ids", "prompt float", ERROR, {"input_ids": prompt.float()})
        self.add_generate(kind, "input_ids", "prompt int32", CONVERT, {"input_ids": prompt.int()}, base)
        self.add_generate(kind, "input_ids", "prompt 1-D", ERROR, {"input_ids": prompt[0]})
        self.add_generate(kind, "input_ids", "prompt as a python list", ERROR, {"input_ids": prompt.tolist()})
        for value, label in ((mask * 2, "values 2"), (mask[:, :-1], "too short"), (mask.float() * 0.5, "value 0.5")):
            self.add_generate(kind, "attention_mask", f"attention_mask {label}", ERROR, {**base, "attention_mask": value})
        self.add_generate(kind, "attention_mask", "attention_mask bool", CONVERT,
                          {**base, "attention_mask": mask.bool()}, {**base, "attention_mask": mask})

    def config_cases(self) -> None:
        bad_values = {
            "vocab_size": [0, -1, 1.5, "48", None], "hidden_size": [0, -4, 30, 33.0], "num_hidden_layers": [0, -1, 1.5],
            "num_attention_heads": [0, -1, 3, 5], "num_key_value_heads": [0, 3, 8], "intermediate_size": [0, -1],
            "max_position_embeddings": [0, -1], "hidden_dropout": [-0.1, 1.5, "0.1"], "attention_dropout": [-0.1, 1.0],
            "rms_norm_eps": [0, -1e-6], "rope_theta": [0, -1.0], "chunk_size_feed_forward": [-1],
            "loss_chunk_size": [-1], "hidden_act": ["nope"], "attn_implementation": ["flash_attention_9"],
            "pad_token_id": [VOCAB, -1], "bos_token_id": [VOCAB], "eos_token_id": [VOCAB, -2],
            "initializer_range": [-0.02], "tie_word_embeddings": ["yes"], "reversible": ["yes"],
            "use_cache": ["no"],
        }
        for name, values in bad_values.items():
            for value in values:
                self.add_config("causal", name, value)
        for name, values in {"encoder_layers": [0, -1], "decoder_layers": [0, 1.5],
                             "decoder_start_token_id": [VOCAB, -1], "is_encoder_decoder": ["yes"]}.items():
            for value in values:
                self.add_config("seq2seq", name, value)

    def add_config(self, kind: str, name: str, value: Any) -> None:
        def run():
            config = (causal_config if kind == "causal" else seq2seq_config)(**{name: value})
            model = (RevFormerForCausalLM if kind == "causal" else RevFormerForConditionalGeneration)(config).eval()
            kwargs = {"input_ids": ids((1, 4)).clamp(max=max(int(config.vocab_size) - 1, 0))}
            with torch.no_grad():
                out = model(**kwargs, **({"decoder_input_ids": kwargs["input_ids"]} if kind == "seq2seq" else {}))
                model.generate(**kwargs, max_new_tokens=2, do_sample=False)
            return out.logits

        self.cases.append(Case(f"{kind}.config", name, f"{name}={value!r}", ERROR, run))


# --------------------------------------------------------------------------------------------------------------
# Files: data files, saved model folders, checkpoints
# --------------------------------------------------------------------------------------------------------------

_PAIR = '{"translation": {"en": "In the beginning", "es": "En el principio"}}\n'
_TEXT = '{"text": "In the beginning God created the heaven and the earth. And the earth was without form."}\n'


class FileHarness:
    """The `data`, `config` and `resume` suites: bad files given to the training scripts and to `from_pretrained`.

    Each case runs the real entry points: the scripts' own `parse_args` and data loading (`load_raw_datasets`, or
    `load_translation_data` and the script's pairing), `from_pretrained` of a saved folder, and `train_lm.main` with
    `--resume_from_checkpoint` on a real checkpoint. `root` is a scratch folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: list[Case] = []
        self.n = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        folder = self.root / f"{self.n:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def build(self, suites: tuple[str, ...]) -> list[Case]:
        try:
            import training.train_lm  # noqa: F401
        except ModuleNotFoundError as err:
            raise SystemExit("The file suites import the training scripts: run `python -m eval.fuzz_inputs` from the "
                             "repository root (or pass --suites models).") from err
        if "data" in suites:
            self.data_cases()
        if "config" in suites:
            self.config_cases()
        if "resume" in suites:
            self.resume_cases()
        return self.cases

    # ---- data --------------------------------------------------------------------------------------------------

    def data_cases(self) -> None:
        contents = {  # description: (content, where in the file the message must point, or "" for the whole file)
            "empty file": ("", ""),
            "blank lines only": ("\n \n\n", ""),
            "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00", "line 1"),
            "not UTF-8": (None, "line 1"),  # filled per script below
            "tab-separated text": ("In the beginning\tEn el principio\n", "line 1"),
            "a broken last line": (None, "line 3"),
            "a line that is a JSON list": ('["a", "b"]\n', "line 1"),
        }
        for script in ("lm", "translation"):
            good = _TEXT if script == "lm" else _PAIR
            field_name = "text" if script == "lm" else "translation.es"
            per_script = {
                **contents,
                "not UTF-8": (good.encode().replace(b"beginning", b"b\xe9ginning"), "line 1"),
                "a broken last line": (good + good + good[: len(good) // 2], "line 3"),
                "a record lacking the field": (good + '{"other": "x"}\n', "line 2"),
                "a number instead of text": (
                    ('{"text": 5}\n' if script == "lm" else '{"translation": {"en": "a", "es": 5}}\n'), "line 1"),
                "all records empty": (
                    ('{"text": " "}\n' * 3 if script == "lm" else '{"translation": {"en": "", "es": " "}}\n' * 3), ""),
            }
            if script == "translation":
                per_script["a pair lacking the target language"] = (good + '{"translation": {"en": "a", "fr": "b"}}\n',
                                                                    "line 2")
            for description, (content, where) in per_script.items():
                self.add_data(script, description, content, where, field_name)
            # a file that does not exist and a wrong extension
            self.add_data(script, "a file that does not exist", None, "", field_name, path="/nonexistent/train.jsonl")
        self.add_data("lm", "a text column named by --text_column_name that does not exist", _TEXT * 2, "line 1",
                      "body", extra=("--text_column_name", "body"))

    def add_data(self, script: str, description: str, content: Any, where: str, field_name: str,
                 path: str | None = None, extra: tuple[str, ...] = ()) -> None:
        if path is None:
            file = self.fresh("train.jsonl")
            (file.write_bytes if isinstance(content, bytes) else file.write_text)(content)
            path = str(file)
        good = self.fresh("validation.jsonl")
        good.write_text((_TEXT if script == "lm" else _PAIR) * 2)
        out = str(good.parent / "out")
        argv = ["--train_file", path, "--validation_file", str(good), "--output_dir", out, *extra]
        must = (path, where) if where else (path,)
        self.cases.append(Case(f"{script}.data", "--train_file", description, ERROR,
                               lambda s=script, a=argv: self._load_data(s, a), must_name=must,
                               clear_types=(ValueError, TypeError, OSError)))

    @staticmethod
    def _load_data(script: str, argv: list[str]) -> Any:
        """What the script does with its data before any model exists (its own functions, whatever their version)."""
        from training import train_lm, train_translation

        if script == "lm":
            args = train_lm.parse_args(argv)
            return train_lm.load_raw_datasets(args)
        from reformer_rev.training.translation import load_translation_data, pairs

        args = train_translation.parse_args(argv)
        raw = load_translation_data(args.dataset_name, args.dataset_config_name, args.train_file,
                                    args.validation_file, args.test_file)
        if hasattr(train_translation, "split_pairs"):
            return [train_translation.split_pairs(raw, split, args) for split in ("train", "validation")]
        return [pairs(raw[split], args.source_lang, args.target_lang) for split in ("train", "validation")]

    # ---- config.json and weights of a saved model --------------------------------------------------------------

    def saved_model(self) -> Path:
        folder = self.fresh("model")
        torch.manual_seed(0)
        RevFormerForCausalLM(causal_config(num_hidden_layers=3)).save_pretrained(folder)
        return folder

    def config_cases(self) -> None:
        edits = {  # field: bad values
            "num_hidden_layers": ["3", -1, 0, 10**9, 2.5],
            "hidden_size": [30, 0],
            "num_attention_heads": [5, 0],
            "vocab_size": [0, 10],
            "max_position_embeddings": [0],
            "hidden_dropout": [1.5],
            "rope_theta": [-1.0],
            "model_type": ["llama"],
            "attn_implementation": ["flash_attention_9"],
            "chunk_size_feed_forward": [-1],
        }
        for name, values in edits.items():
            for value in values:
                self.add_config(name, f"config.json {name}={value!r}", lambda c, n=name, v=value: c.update({n: v}))
        self.add_config("config.json", "config.json not JSON", None, raw="{not json")
        self.add_config("num_hidden_layers", "config.json with fewer layers than the weights",
                        lambda c: c.update(num_hidden_layers=1), expect=WARN, must_name=("2 more layer",))
        for description, damage in (("flipped bytes", _flip_bytes), ("dtype in the header rewritten", _retype_header),
                                    ("offsets in the header swapped", _swap_offsets), ("truncated", _truncate_file),
                                    ("NaN weights", None)):
            self.add_weights(description, damage)

    def add_config(self, name: str, description: str, edit: Callable | None, raw: str | None = None,
                   expect: str = ERROR, must_name: tuple[str, ...] = ()) -> None:
        # An absurd depth is only loaded as a config: accepted, the model would be built for hours and exhaust the
        # memory (it did, in the measurement before issue 24), so accepting the config is the failure.
        config_only = "10**9" in description or "1000000000" in description

        def run(edit=edit, raw=raw):
            folder = self.saved_model()
            path = folder / "config.json"
            if raw is not None:
                path.write_text(raw)
            else:
                config = json.loads(path.read_text())
                edit(config)
                path.write_text(json.dumps(config))
            if config_only:
                return torch.tensor([float(RevFormerConfig.from_pretrained(folder).num_hidden_layers)])
            return RevFormerForCausalLM.from_pretrained(folder)(ids((1, 4)).clamp(max=VOCAB - 1)).logits

        self.cases.append(Case("causal.config_file", name, description, expect, run, must_name=must_name,
                               names=("config.json",), clear_types=(ValueError, TypeError, OSError)))

    def add_weights(self, description: str, damage: Callable | None) -> None:
        def run(damage=damage):
            if damage is None:  # a model that was saved after its weights became NaN
                folder = self.fresh("nan")
                model = RevFormerForCausalLM(causal_config())
                with torch.no_grad():
                    model.model.embed_tokens.weight[3, 0] = float("nan")
                model.save_pretrained(folder)
            else:
                folder = self.saved_model()
                damage(folder / "model.safetensors")
            return RevFormerForCausalLM.from_pretrained(folder)(ids((1, 4))).logits

        self.cases.append(Case("causal.weights_file", "model.safetensors", f"model.safetensors {description}", ERROR,
                               run, names=("NaN",), clear_types=(ValueError, TypeError, OSError)))

    # ---- checkpoints given to --resume_from_checkpoint -----------------------------------------------------------

    def resume_cases(self) -> None:
        self._reference: Path | None = None
        damages = {
            "manifest entry not an object": ("manifest.json", json_edit(("files", "model.safetensors"), "big")),
            "manifest lists a path outside the checkpoint": (
                "manifest.json", json_edit(("files", "../../x"), {"size": 1, "sha256": "0"})),
            "model weights flipped": ("model.safetensors", _flip_bytes),
            "RNG state of the wrong size": ("rng_state_0.safetensors", tensors_edit(short_rng_state)),
            "NumPy RNG position out of range": ("rng_state_0.safetensors", tensors_edit(numpy_position_out_of_range)),
            "optimizer tensor of the wrong shape": ("optimizer.safetensors", tensors_edit(transpose_exp_avg)),
            "scheduler last_epoch a string": ("scheduler.json", json_edit(("last_epoch",), "2")),
            "scheduler with an unknown schedule": ("scheduler.json", json_edit(("lr_lambdas", 0, "kind"), "nope")),
            "trainer state: data position 10**9": ("trainer_state.json", json_edit(("batches_in_epoch",), 10**9)),
            "trainer state: run length 10**9": ("trainer_state.json", json_edit(("max_train_steps",), 10**9)),
        }
        for description, (file, damage) in damages.items():
            self.add_resume(description, file, damage, ())
        for option, value in (("--learning_rate", "2e-2"), ("--per_device_train_batch_size", "4"), ("--seed", "7"),
                              ("--block_size", "32"), ("--gradient_accumulation_steps", "2"),
                              ("--lr_scheduler_type", "linear")):
            self.add_resume(f"resumed with {option} {value}", None, None, (option, value))

    def _tiny_argv(self, out: Path) -> list[str]:
        data = self.root / "resume_data"
        if not data.exists():
            data.mkdir(parents=True)
            from training import train_lm  # noqa: F401 - imports the script before the first case times itself
            lines = [json.dumps({"text": f"In the beginning {i} God created the heaven and the earth. " * 4}) + "\n"
                     for i in range(60)]
            (data / "train.jsonl").write_text("".join(lines))
            (data / "validation.jsonl").write_text("".join(lines[:15]))
        return ["--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
                "--output_dir", str(out), "--block_size", "64", "--hidden_size", "32", "--num_hidden_layers", "1",
                "--num_attention_heads", "2", "--intermediate_size", "64", "--per_device_train_batch_size", "2",
                "--eval_steps", "0", "--max_eval_blocks", "2", "--sample_tokens", "0", "--time_budget_minutes", "0",
                "--checkpointing_steps", "2", "--cpu"]

    def _checkpoint(self) -> Path:
        """A run of 2 steps with its checkpoint step_2 (made once; each case copies it)."""
        if self._reference is None:
            from training import train_lm

            out = self.root / "resume_reference"
            _reset_accelerate()
            train_lm.main(self._tiny_argv(out) + ["--max_train_steps", "2"])
            self._reference = out
        return self._reference

    def add_resume(self, description: str, file: str | None, damage: Callable | None, extra: tuple[str, ...]) -> None:
        def run(file=file, damage=damage, extra=extra):
            import shutil

            from training import train_lm

            out = self.fresh("run")
            shutil.copytree(self._checkpoint(), out)
            ckpt = out / "checkpoints" / "step_2"
            if damage is not None:
                damage(ckpt / file)
                # Damage to the content is made to pass the manifest (it vouches for it: only parsing can catch it);
                # flipped bytes are what the manifest itself is there to catch.
                if file != "manifest.json" and damage is not _flip_bytes:
                    _rewrite_manifest(ckpt)
            _reset_accelerate()
            results = train_lm.main(self._tiny_argv(out) + ["--max_train_steps", "3", *extra,
                                                            "--resume_from_checkpoint", str(ckpt)])
            return torch.tensor([float(results["train"]["steps"])])

        names = (file,) if file else (extra[0].lstrip("-"),)
        self.cases.append(Case("lm.resume", names[0], description, ERROR, run, names=names,
                               clear_types=(ValueError, TypeError, OSError), timeout=120))


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _rewrite_manifest(folder: Path) -> None:
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def json_edit(keys: tuple, value: Any) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = json.loads(path.read_text())
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        path.write_text(json.dumps(data))
    return edit


def tensors_edit(edit: Callable[[dict, dict], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        from safetensors.torch import load, save

        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("json", "{}"))
        tensors = load(data)
        edit(tensors, meta)
        path.write_bytes(save(tensors, metadata={"json": json.dumps(meta)}))
    return damage


def short_rng_state(tensors: dict, meta: dict) -> None:
    tensors["torch_cpu"] = tensors["torch_cpu"][:100].clone()


def numpy_position_out_of_range(tensors: dict, meta: dict) -> None:
    meta["numpy"][1] = 10**6


def transpose_exp_avg(tensors: dict, meta: dict) -> None:  # a non-square one: its shape is then wrong
    key = next(k for k in tensors if k.endswith("\x00exp_avg") and tensors[k].dim() == 2
               and tensors[k].shape[0] != tensors[k].shape[1])
    tensors[key] = tensors[key].t().contiguous()


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _safetensors_header(path: Path, edit: Callable[[dict], None]) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    path.write_bytes(data[:8] + raw + data[8 + n :])


def _retype_header(path: Path) -> None:  # F32 -> I32: same sizes, other numbers
    def edit(header: dict) -> None:
        header[next(k for k in header if k != "__metadata__")]["dtype"] = "I32"
    _safetensors_header(path, edit)


def _swap_offsets(path: Path) -> None:  # two tensors of the same shape swap their data
    def edit(header: dict) -> None:
        by_shape: dict[tuple, list[str]] = {}
        for k, v in header.items():
            if k != "__metadata__":
                by_shape.setdefault(tuple(v["shape"]), []).append(k)
        a, b = next(names for names in by_shape.values() if len(names) >= 2)[:2]
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    _safetensors_header(path, edit)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_target: dict[str, Counter] = {}
    for r in records:
        by_target.setdefault(r["target"].split(".")[0] + "." + r["target"].split(".")[1], Counter())[r["category"]] += 1
    total = Counter(r["category"] for r in records)
    origins = Counter(r.get("raised_in") for r in records if r["category"] == "opaque")
    return {"cases": len(records), **{c: total[c] for c in CATEGORIES},
            "by_target": {t: {c: n[c] for c in CATEGORIES} for t, n in sorted(by_target.items())},
            "opaque_raised_in": dict(origins)}


def render(summary: dict[str, Any]) -> str:
    rows = [f"| {'target':<18} | " + " | ".join(f"{c:>7}" for c in CATEGORIES) + " |",
            "|" + "---|" * (len(CATEGORIES) + 1)]
    for target, counts in summary["by_target"].items():
        rows.append(f"| {target:<18} | " + " | ".join(f"{counts[c]:>7}" for c in CATEGORIES) + " |")
    rows.append(f"| {'all ' + str(summary['cases']) + ' cases':<18} | "
                + " | ".join(f"{summary[c]:>7}" for c in CATEGORIES) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/fuzz"))
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. the git commit)")
    parser.add_argument("--suites", default=",".join(SUITES),
                        help=f"comma-separated, of {SUITES}: the models' inputs, data files, saved model folders, "
                             "checkpoints given to --resume_from_checkpoint")
    args = parser.parse_args(argv)
    suites = tuple(x.strip() for x in args.suites.split(",") if x.strip())
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        parser.error(f"--suites: unknown {unknown}; choose from {SUITES}")
    torch.set_num_threads(1)
    import tempfile  # noqa: PLC0415
    import transformers  # noqa: PLC0415 - only for the version in the results

    cases = Harness().build() if "models" in suites else []
    with tempfile.TemporaryDirectory(prefix="fuzz_files_") as scratch:
        cases += FileHarness(Path(scratch)).build(suites)
        records = [classify(case) for case in cases]
    summary = summarize(records)
    print(render(summary))
    if summary["opaque_raised_in"]:
        print("opaque errors raised in:", summary["opaque_raised_in"])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "fuzz_results.json"
    payload = {"label": args.label, "torch": torch.__version__, "transformers": transformers.__version__,
               "summary": summary, "cases": records}
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
