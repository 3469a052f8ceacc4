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

    python eval/fuzz_inputs.py                      # ~600 cases, about a minute on 2 cores
    python eval/fuzz_inputs.py --output_dir DIR     # default: outputs/fuzz (scratch, git-ignored)
"""

from __future__ import annotations

import argparse
import json
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
# variant of a valid input: may be refused clearly, or accepted with the same result as the valid input).
ERROR, VALID, CONVERT = "error", "valid", "convert"


@dataclass
class Case:
    target: str  # e.g. "causal.forward.eval", "seq2seq.generate", "config"
    argument: str  # the argument a clear error must name
    description: str
    expect: str
    run: Callable[[], Any]  # returns the output to check (a tensor), raises for refused inputs
    reference: Callable[[], Any] | None = None  # the equivalent valid input's output (CONVERT cases)
    names: tuple[str, ...] = field(default=())  # other names that count as naming the argument


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
    try:
        out = case.run()
    except Exception as err:  # noqa: BLE001 - classifying every failure is the point
        message = f"{type(err).__name__}: {err}"
        record.update(error=message[:400], raised_in=_origin(err))
        names = (case.argument, *case.names)
        clear = isinstance(err, (ValueError, TypeError)) and any(n in str(err) for n in names)
        if case.expect == VALID:
            record["category"] = "refused"
        else:
            record["category"] = "clear" if clear else "opaque"
        return record
    if case.expect == ERROR:
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers  # noqa: PLC0415 - only for the version in the results

    records = [classify(case) for case in Harness().build()]
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
