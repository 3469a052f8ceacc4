"""`train_lm.main` under torchrun with a NaN loss *value* on rank 1 only (its gradients stay finite).

Run by tests/test_reliability.py. Only the all-reduced non-finite flag can make rank 0, whose own loss is finite,
skip the step too; otherwise the ranks would disagree (one steps, the other skips or stops) and DDP would hang.
"""

import os
import sys

from reformer_rev import RevFormerForCausalLM
from training import train_lm

POISONED_CALL = 3  # with --gradient_accumulation_steps 2: the first micro-batch of step 2

if int(os.environ["RANK"]) == 1:
    original = RevFormerForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] == POISONED_CALL:
                out.loss = out.loss + float("nan")  # NaN value, finite gradient
        return out

    RevFormerForCausalLM.forward = forward

if __name__ == "__main__":
    train_lm.main(sys.argv[1:])
