"""The bad-input fuzz harness (eval/fuzz_inputs.py) classifies what it sees correctly and writes its results."""

from __future__ import annotations

import json

import pytest

from eval import fuzz_inputs
from eval.fuzz_inputs import CONVERT, ERROR, VALID, Case, classify


def _raise(err):
    def run():
        raise err
    return run


def _returns(value):
    return lambda: value


@pytest.mark.parametrize(
    "expect, run, reference, category",
    [
        (ERROR, _raise(ValueError("`labels` contains 50, outside [0, 48).")), None, "clear"),
        (ERROR, _raise(TypeError("`labels` must be an integer tensor")), None, "clear"),
        (ERROR, _raise(ValueError("shape mismatch")), None, "opaque"),  # does not name the argument
        (ERROR, _raise(IndexError("Target 50 is out of bounds.")), None, "opaque"),
        (ERROR, _returns(fuzz_inputs.torch.ones(2)), None, "silent"),
        (CONVERT, _returns(fuzz_inputs.torch.ones(2)), _returns(fuzz_inputs.torch.ones(2)), "valid"),
        (CONVERT, _returns(fuzz_inputs.torch.ones(2)), _returns(fuzz_inputs.torch.zeros(2)), "silent"),
        (CONVERT, _raise(TypeError("`labels` must be int64")), _returns(fuzz_inputs.torch.ones(2)), "clear"),
        (VALID, _returns(fuzz_inputs.torch.tensor([1.0, float("nan")])), None, "silent"),
        (VALID, _raise(ValueError("`labels` ...")), None, "refused"),
    ],
)
def test_classification(expect, run, reference, category):
    assert classify(Case("t", "labels", "d", expect, run, reference))["category"] == category


def test_opaque_errors_record_where_they_were_raised():
    import torch

    record = classify(Case("t", "labels", "d", ERROR, lambda: torch.nn.functional.cross_entropy(
        torch.zeros(2, 3), torch.tensor([0, 7]))))
    assert record["category"] == "opaque" and record["raised_in"] == "torch"


def test_the_harness_covers_both_models_and_all_entry_points():
    cases = fuzz_inputs.Harness().build()
    assert len(cases) >= 600
    targets = {c.target for c in cases}
    for kind in ("causal", "seq2seq"):
        assert {f"{kind}.forward.eval", f"{kind}.forward.train", f"{kind}.generate", f"{kind}.config"} <= targets
    assert {c.expect for c in cases} == {ERROR, VALID, CONVERT}
    assert all(c.reference is not None for c in cases if c.expect == CONVERT)


@pytest.mark.slow
def test_run_writes_counts_that_add_up(tmp_path):
    payload = fuzz_inputs.main(["--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "fuzz_results.json").read_text())
    summary = saved["summary"]
    assert summary == payload["summary"]
    assert summary["cases"] == len(saved["cases"]) >= 600
    assert sum(summary[c] for c in fuzz_inputs.CATEGORIES) == summary["cases"]
    # Valid inputs are accepted: whatever else the model refuses, it must not refuse these.
    assert summary["refused"] == 0, [c for c in saved["cases"] if c["category"] == "refused"][:3]
    assert summary["valid"] > 0
    # The property the harness exists for: every bad input gets a clear error or a correct result. No opaque error;
    # the only silent cases are generate's documented precedence of `max_new_tokens` over `max_length` (transformers
    # logs a warning and generates `max_new_tokens`).
    opaque = [c for c in saved["cases"] if c["category"] == "opaque"]
    assert not opaque, opaque[:3]
    silent = {(c["target"], c["description"]) for c in saved["cases"] if c["category"] == "silent"}
    assert silent <= {("causal.generate", "max_length=2"), ("seq2seq.generate", "max_length=2")}, silent


def test_file_suites_cover_data_config_and_resume(tmp_path):
    cases = fuzz_inputs.FileHarness(tmp_path).build(("data", "config", "resume"))
    targets = {c.target for c in cases}
    assert targets == {"lm.data", "translation.data", "causal.config_file", "causal.weights_file", "lm.resume"}
    assert len(cases) >= 60 and {c.expect for c in cases} == {ERROR, fuzz_inputs.WARN}
    assert all(c.timeout for c in cases if c.target == "lm.resume")  # a hang is a finding, not a stuck harness


def test_file_case_classification(tmp_path):
    path = str(tmp_path / "train.jsonl")
    named = Case("lm.data", "--train_file", "d", ERROR, _raise(OSError(f"`--train_file` {path!r} line 3: not JSON")),
                 must_name=(path, "line 3"), clear_types=(ValueError, OSError))
    assert classify(named)["category"] == "clear"
    vague = Case("lm.data", "--train_file", "d", ERROR, _raise(ValueError("`--train_file`: could not read it")),
                 must_name=(path, "line 3"))
    assert classify(vague)["category"] == "opaque"  # names the option but neither the file nor the line

    def warns():
        import logging

        logging.getLogger("reformer_rev.test").warning("the folder holds the weights of 2 more layer(s)")
        return fuzz_inputs.torch.ones(1)

    assert classify(Case("c", "config.json", "d", fuzz_inputs.WARN, warns, names=("weights",),
                         must_name=("2 more layer",)))["category"] == "clear"
    assert classify(Case("c", "config.json", "d", fuzz_inputs.WARN, _returns(fuzz_inputs.torch.ones(1)),
                         must_name=("2 more layer",)))["category"] == "silent"

    def hangs():
        while True:
            pass

    record = classify(Case("lm.resume", "trainer_state.json", "d", ERROR, hangs, timeout=0.2))
    assert record["category"] == "silent" and "hangs" in record["problem"]
