#!/usr/bin/env python3
"""Concurrent `save_pretrained` into one folder, and loading while a save writes: torn or mixed models, measured.

    python -m eval.save_concurrency --trials 20 --reader_seconds 30

Two saves are told apart by a config value and by the weights (model A: `initializer_range` 0.011 and every weight
1.0; model B: 0.033 and 2.0), so a loaded model whose config and weights disagree is a *torn* (mixed) one.

* writers: per trial, two processes released by one barrier both `save_pretrained` into the same fresh folder; the
  folder is then loaded and checked;
* reader while writer: one process saves A, B, A, ... into one folder while another loads it in a loop.

Each runs through `RevFormerPreTrainedModel.save_pretrained` / `from_pretrained` (the library's own path) and, as the
baseline, through plain `transformers.PreTrainedModel.save_pretrained` / `from_pretrained` on the same model (what
the library did before). `--family llama` measures a stock `LlamaForCausalLM` instead (what `make_reversible` leaves:
the class is unchanged), saved and loaded with `reformer_rev.safe_io.save_pretrained_safely` /
`from_pretrained_safely` against its own stock methods. Results go to `outputs/save_concurrency.json` (`--output`).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

MARKS = {"A": (0.011, 1.0), "B": (0.033, 2.0)}


FAMILY = os.environ.get("SAVE_CONCURRENCY_FAMILY", "reformer_rev")  # read by the spawned processes too


def make_model(name: str):
    import torch

    init, value = MARKS[name]
    if FAMILY == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, initializer_range=init))
    else:
        from reformer_rev import RevFormerConfig, RevFormerForCausalLM

        config = RevFormerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, initializer_range=init)
        model = RevFormerForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def save(model, folder: str, library_path: bool) -> None:
    from transformers import PreTrainedModel

    from reformer_rev.safe_io import save_pretrained_safely

    if library_path:
        save_pretrained_safely(model, folder) if FAMILY == "llama" else model.save_pretrained(folder)
    else:  # the plain transformers implementation, on the same object
        PreTrainedModel.save_pretrained(model, folder)


def load_and_classify(folder: str, library_path: bool) -> str:
    """'A' / 'B' for a consistent model, 'torn' when config and weights come from different saves."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedModel

    from reformer_rev import RevFormerForCausalLM
    from reformer_rev.safe_io import from_pretrained_safely

    cls = LlamaForCausalLM if FAMILY == "llama" else RevFormerForCausalLM
    if library_path:
        cls_load = (lambda path: from_pretrained_safely(cls, path)) if FAMILY == "llama" else cls.from_pretrained
    else:
        cls_load = lambda path: PreTrainedModel.from_pretrained.__func__(cls, path)  # noqa: E731
    model = cls_load(folder)
    init = model.config.initializer_range
    weight = model.model.embed_tokens.weight.detach()
    config_says = next(n for n, (i, _) in MARKS.items() if abs(i - init) < 1e-9)
    values = {float(v) for v in torch.unique(weight)}
    weights_say = next((n for n, (_, v) in MARKS.items() if values == {v}), None)
    return config_says if weights_say == config_says else "torn"


def _writer(name: str, root: str, trials: int, barrier, library_path: bool) -> None:
    import torch

    torch.set_num_threads(1)
    model = make_model(name)
    for trial in range(trials):
        barrier.wait()
        save(model, os.path.join(root, f"trial_{trial}"), library_path)
        barrier.wait()  # both saves done before the next trial starts


def concurrent_writers(trials: int, library_path: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    root = tempfile.mkdtemp(prefix="save_concurrency_")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(n, root, trials, barrier, library_path)) for n in MARKS]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    outcomes = []
    for trial in range(trials):
        try:
            outcomes.append(load_and_classify(os.path.join(root, f"trial_{trial}"), library_path))
        except Exception as err:  # noqa: BLE001 - a failed load is an outcome too
            outcomes.append(f"error: {type(err).__name__}")
    shutil.rmtree(root, ignore_errors=True)
    return {"trials": trials, "torn": outcomes.count("torn"),
            "errors": sum(o.startswith("error") for o in outcomes), "outcomes": outcomes}


def _alternating_writer(folder: str, seconds: float, library_path: bool, saves) -> None:
    import torch

    torch.set_num_threads(1)
    models = [make_model("A"), make_model("B")]
    end, n = time.time() + seconds, 0
    while time.time() < end:
        save(models[n % 2], folder, library_path)
        n += 1
    saves.value = n


def reader_while_writer(seconds: float, library_path: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="save_reader_")
    save(make_model("A"), folder, library_path)
    saves = ctx.Value("i", 0)
    writer = ctx.Process(target=_alternating_writer, args=(folder, seconds, library_path, saves))
    writer.start()
    counts: dict[str, int] = {}
    while writer.is_alive():
        try:
            outcome = load_and_classify(folder, library_path)
        except Exception as err:  # noqa: BLE001
            outcome = f"error: {type(err).__name__}"
        counts[outcome] = counts.get(outcome, 0) + 1
    writer.join()
    shutil.rmtree(folder, ignore_errors=True)
    loads = sum(counts.values())
    return {"seconds": seconds, "saves": saves.value, "loads": loads, "torn": counts.get("torn", 0),
            "errors": sum(v for k, v in counts.items() if k.startswith("error")), "outcomes": counts,
            "torn_fraction": counts.get("torn", 0) / max(1, loads)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global FAMILY
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--reader_seconds", type=float, default=30.0)
    p.add_argument("--no_baseline", action="store_true", help="skip the plain-transformers measurement")
    p.add_argument("--family", choices=("reformer_rev", "llama"), default="reformer_rev",
                   help="reformer_rev: RevFormerForCausalLM; llama: a stock LlamaForCausalLM (as make_reversible "
                        "leaves it) through safe_io.save_pretrained_safely/from_pretrained_safely")
    p.add_argument("--output", type=Path, default=Path("outputs/save_concurrency.json"))
    args = p.parse_args(argv)
    previous = FAMILY, os.environ.get("SAVE_CONCURRENCY_FAMILY")
    FAMILY = os.environ["SAVE_CONCURRENCY_FAMILY"] = args.family  # the spawned processes read the variable
    try:
        return _measure(args)
    finally:
        FAMILY = previous[0]
        if previous[1] is None:
            os.environ.pop("SAVE_CONCURRENCY_FAMILY", None)
        else:
            os.environ["SAVE_CONCURRENCY_FAMILY"] = previous[1]


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    labels = ("reformer_rev", "plain transformers") if FAMILY != "llama" else ("safe_io", "stock transformers")
    for label, library_path in zip(labels, (True, False)):
        if not library_path and args.no_baseline:
            continue
        results[label] = {
            "concurrent_writers": concurrent_writers(args.trials, library_path),
            "reader_while_writer": reader_while_writer(args.reader_seconds, library_path),
        }
    print("| save path | concurrent writers: torn / trials | reader while writer: torn / loads (saves) | load errors |")
    print("|---|---|---|---|")
    for label, r in results.items():
        w, rw = r["concurrent_writers"], r["reader_while_writer"]
        print(f"| {label} | {w['torn']} / {w['trials']} | {rw['torn']} / {rw['loads']} ({rw['saves']}) "
              f"| {w['errors'] + rw['errors']} |")
    from reformer_rev.safe_io import atomic_write_json

    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, results)
    return results


if __name__ == "__main__":
    main()
