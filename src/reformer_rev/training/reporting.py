"""What a finished run shows: a loss-curve PNG, a translation-score PNG and a short generated sample."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def plot_loss_curve(
    path: str | os.PathLike,
    steps: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]],
    title: str,
    scale: float = 1.0,
    unit: str = "loss (nats/token)",
) -> bool:
    """Per-step training loss (and its running mean) and the periodic validation loss, times `scale`, as a PNG.

    `steps`: records with `step` and `loss` (None for skipped steps); `evals`: records with `step` and `loss`.
    Returns False (with a warning) when matplotlib is not installed: the plot is a convenience, not a result.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(f"matplotlib is not installed (`pip install matplotlib`): no loss curve written to {path}.")
        return False
    points = [(r["step"], r["loss"] * scale) for r in steps if r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        x, y = zip(*points)
        ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="training (per step)")
        window = max(1, len(y) // 20)
        smooth = [sum(y[max(0, i - window + 1) : i + 1]) / len(y[max(0, i - window + 1) : i + 1]) for i in range(len(y))]
        ax.plot(x, smooth, color="tab:blue", linewidth=1.8, label=f"training (mean of {window})")
    ev = [(r["step"], r["loss"] * scale) for r in evals if r.get("loss") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", color="tab:orange", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(unit)
    return _finish(fig, ax, path, title)


def plot_translation_curve(path: str | os.PathLike, evals: Sequence[dict[str, Any]], title: str) -> bool:
    """Validation chrF and BLEU against wall-clock minutes since the start of the job (records with `minutes`,
    `val_chrf`, `val_bleu` and, when known, the copy-the-source baseline `copy_source_chrf`/`copy_source_bleu`).
    Returns False (with a warning) without matplotlib, or when no evaluation decoded anything."""
    points = [e for e in evals if e.get("val_chrf") is not None and e.get("minutes") is not None]
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(f"matplotlib is not installed (`pip install matplotlib`): no score curve written to {path}.")
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    minutes = [e["minutes"] for e in points]
    for key, label, color in (("chrf", "chrF", "tab:green"), ("bleu", "BLEU", "tab:purple")):
        ax.plot(minutes, [e[f"val_{key}"] for e in points], "o-", color=color, label=f"validation {label}")
        copy = points[-1].get(f"copy_source_{key}")
        if copy is not None:
            ax.axhline(copy, color=color, linestyle="--", alpha=0.6, label=f"copy the source ({label})")
    ax.set_xlabel("minutes since the start of the job")
    ax.set_ylabel("score (greedy decoding)")
    return _finish(fig, ax, path, title)


def _finish(fig: Any, ax: Any, path: str | os.PathLike, title: str) -> bool:
    """Title, grid and legend of a curve; saved to `path` and closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt  # the callers imported it (with the Agg backend) already
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@torch.no_grad()
def generate_sample(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 200, seed: int = 0,
                    temperature: float = 0.8, top_k: int = 40) -> str:
    """A sampled continuation of `prompt` (fixed seed, without touching the global RNG)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             top_k=top_k, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)


__all__ = ["generate_sample", "plot_loss_curve", "plot_translation_curve"]
