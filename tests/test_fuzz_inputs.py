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
