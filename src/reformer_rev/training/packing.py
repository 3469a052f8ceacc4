"""Packed training batches: documents share rows without attending to each other (`--packing` of train_lm.py).

The classic language-modelling recipe (`run_clm`) concatenates documents and cuts the stream into blocks: no padding,
but a block that holds the end of one document and the start of the next lets the second attend to the first. Packing
keeps the blocks (same rows, same tokens, no padding) and adds `position_ids` that restart at every document start;
the models read restarting positions as separate documents (block-diagonal attention, `model_inputs.find_documents`),
as transformers' `DataCollatorWithFlattening` and TRL's padding-free batches expect. The alternative without
cross-document attention, one document per row padded to the longest, is `collate_padded` (the baseline of
`eval/bench_packing.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

IGNORE_INDEX = -100


def pack_documents(documents: Iterable[list[int]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate `documents` and cut the stream into rows of exactly `block_size` tokens (the remainder shorter than
    a row is dropped, as in `run_clm`), with `position_ids` counted from each document's start -- and from each row's
    start, since a document cut by a row boundary continues as a new document in the next row."""
    if block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")
    tokens: list[int] = []
    positions: list[int] = []
    for doc in documents:
        tokens.extend(doc)
        positions.extend(range(len(doc)))
    rows = len(tokens) // block_size
    input_ids, position_ids = [], []
    for r in range(rows):
        row = positions[r * block_size : (r + 1) * block_size]
        offset = row[0]  # a document continued from the previous row starts again at 0
        restarted = []
        for p in row:
            if p == 0:
                offset = 0
            restarted.append(p - offset)
        input_ids.append(tokens[r * block_size : (r + 1) * block_size])
        position_ids.append(restarted)
    return {"input_ids": input_ids, "position_ids": position_ids}


def collate_packed(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Rows from `pack_documents`: `input_ids`, `position_ids` and `labels`, where the first token of each document is
    no target (it would be predicted from the end of the previous document)."""
    ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
    positions = torch.tensor([e["position_ids"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "position_ids": positions, "labels": ids.masked_fill(positions == 0, IGNORE_INDEX)}


def collate_padded(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One document per row, right-padded to the longest of the batch: `input_ids`, `attention_mask` and `labels`
    (-100 on padding)."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[row, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


__all__ = ["pack_documents", "collate_packed", "collate_padded"]
