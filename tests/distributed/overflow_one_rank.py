"""`train_lm.main` under torchrun where rank 1's forward raises a fixed-point `OverflowError` once (the 3rd training
forward: with --gradient_accumulation_steps 2, the first micro-batch of step 2).

Run by tests/test_reliability.py. Rank 0's forward is fine; without the processes agreeing that a forward overflowed,
rank 0 would wait forever in DDP's gradient all-reduce for rank 1, which has no graph to run backward on.
"""

import os
import sys

from reformer_rev import RevFormerForCausalLM
from training import train_lm

OVERFLOWING_CALL = 3

if int(os.environ["RANK"]) == 1:
    original = RevFormerForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == OVERFLOWING_CALL:
                raise OverflowError("Fixed-point stream overflow: injected on rank 1")
        return original(self, *args, **kwargs)

    RevFormerForCausalLM.forward = forward

if __name__ == "__main__":
    train_lm.main(sys.argv[1:])
