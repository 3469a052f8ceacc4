"""Count FSDP2's collectives for one forward+backward of a sharded reversible model (docs/distributed.md, "Cost").

Each block's `f`/`g` call is one FSDP forward/backward pair, so the all-gathers and reduce-scatters grow with the
number of calls (and of feed-forward chunks), not with the number of blocks. Counted by wrapping the two
`torch.distributed` functions FSDP2 uses for them, `all_gather_single` and `reduce_scatter_single`, for 3 blocks,
sequence 24, `chunk_size_feed_forward` 0 and 4, `reshard_after_forward` True and False.
Run: `torchrun --nproc_per_node 2 fsdp_collectives.py OUT.json`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from _common import finish, tiny_config, write_result

from reformer_rev import RevFormerForCausalLM
from reformer_rev.distributed import shard_reversible_model


def main() -> None:
    dist.init_process_group("gloo")
    counts = {"all_gathers": 0, "reduce_scatters": 0}

    def counting(fn, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    dist.all_gather_single = counting(dist.all_gather_single, "all_gathers")
    dist.reduce_scatter_single = counting(dist.reduce_scatter_single, "reduce_scatters")
    results = {}
    for chunk in (0, 4):
        for reshard in (True, False):
            torch.manual_seed(0)
            model = RevFormerForCausalLM(tiny_config(num_hidden_layers=3, chunk_size_feed_forward=chunk))
            shard_reversible_model(model, reshard_after_forward=reshard)
            ids = torch.randint(3, 64, (1, 24))
            counts.update(all_gathers=0, reduce_scatters=0)
            model(ids, labels=ids).loss.backward()
            results[f"chunk_size_feed_forward={chunk},reshard_after_forward={reshard}"] = dict(counts)
    write_result(results)
    finish()


if __name__ == "__main__":
    main()
