#!/usr/bin/env python
"""The family table of docs/pretrained.md: every family `make_reversible` supports, measured on tiny random models.

Per family (the tiny float64 configs of `tests/_tiny_hf.py::family_model`: 3 layers, hidden 32, the family's
distinguishing features on, norm weights randomised, every dropout at 0.1):

* eval-logit error: max |logits| difference between the converted model in eval mode and the original (padded batch;
  Gemma without left padding, which gives NaN in plain transformers);
* structure error: the converted stack run at coupling coefficient 0 (the plain residual update, 52-bit fixed point)
  against the original layers' own training forward, dropout on, same seed: a wrong description of a layer (a norm,
  a multiplier, a dropout out of place) shows here, not in the two other columns;
* gradient error: largest relative difference of a parameter gradient between the reversible model and its
  ordinary-autograd twin (`reversible=False`), default coupling (heavy-ball, gamma 1/32), dropout on.

    python -m eval.bench_families                   # prints the table, writes outputs/benchmarks/... (scratch)
    python -m eval.bench_families --update_docs     # also docs/benchmarks/families.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from eval._bench_common import REPO_ROOT, environment, markdown_table, write_bench_outputs

sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tiny family configs the tests use
from _tiny_hf import ALL_FAMILIES, family_model  # noqa: E402
from test_families import batch, training_logits_error, twin_gradient_errors  # noqa: E402

from reformer_rev import make_reversible  # noqa: E402
from reformer_rev.conversion import SUPPORTED_MODEL_CLASSES  # noqa: E402
from reformer_rev.conversion_families import SUPPORTED_FAMILIES  # noqa: E402


def eval_error(model_type: str) -> float:
    original = family_model(model_type, dropout=0.1).eval()
    model = make_reversible(copy.deepcopy(original))
    ids, mask, _ = batch(model_type)
    return (model(ids, attention_mask=mask).logits - original(ids, attention_mask=mask).logits).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help="where to write families.{json,md} (default: scratch)")
    parser.add_argument("--update_docs", action="store_true", help="also write docs/benchmarks/families.{json,md}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    classes = {t: c for c, t in SUPPORTED_MODEL_CLASSES.items()}
    rows, results = [], {}
    for model_type in ALL_FAMILIES:
        t0 = time.process_time()
        spec = SUPPORTED_FAMILIES[model_type]
        loss, grad = twin_gradient_errors(model_type)
        r = {
            "class": classes[model_type], "pattern": spec.pattern, "eval_logit_max_abs_err": eval_error(model_type),
            "structure_max_abs_err": training_logits_error(model_type), "grad_max_rel_err_vs_twin": grad,
            "loss_abs_diff_vs_twin": loss, "cpu_s": time.process_time() - t0,
        }
        results[model_type] = r
        rows.append([f"`{r['class']}`", r["pattern"], f"{r['eval_logit_max_abs_err']:.1e}",
                     f"{r['structure_max_abs_err']:.1e}", f"{r['grad_max_rel_err_vs_twin']:.1e}"])
        print(model_type, {k: v for k, v in r.items() if k not in ("class", "pattern")}, flush=True)
    table = markdown_table(
        ["class", "what differs (layer structure)", "eval-logit error", "structure error (coef. 0)",
         "gradient error vs twin"],
        rows,
    )
    print(table)
    write_bench_outputs("families", {"environment": environment(), "results": results}, table, args.output_dir,
                        args.update_docs)


if __name__ == "__main__":
    main()
