"""A training script run as a real process for the preemption tests (tests/test_preemption.py).

`python preemptible.py {lm,translation} ARGS...` runs `training/train_lm.py` or `training/train_translation.py` with
ARGS, after writing this process's PID to `$PREEMPT_PID_DIR/rank_$RANK` (so a test can signal one chosen rank of a
torchrun job). With `PREEMPT_SLOW_SAVE_SECONDS=S` every checkpoint save first sleeps S seconds: a stop then takes
longer than the test's second signal, or the --stop_grace_seconds watchdog. With `PREEMPT_SLOW_EVAL_SECONDS=S` every
evaluation forward of the causal LM sleeps S seconds (a machine that became loaded after the last estimate).
"""

import os
import sys
import time
from pathlib import Path

from reformer_rev.training.checkpointing import CheckpointManager
from training import train_lm, train_translation

if os.environ.get("PREEMPT_PID_DIR"):
    Path(os.environ["PREEMPT_PID_DIR"]).mkdir(parents=True, exist_ok=True)
    Path(os.environ["PREEMPT_PID_DIR"], f"rank_{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))

if os.environ.get("PREEMPT_SLOW_SAVE_SECONDS"):
    original_save = CheckpointManager.save

    def slow_save(self, state):
        time.sleep(float(os.environ["PREEMPT_SLOW_SAVE_SECONDS"]))
        return original_save(self, state)

    CheckpointManager.save = slow_save

if os.environ.get("PREEMPT_SLOW_EVAL_SECONDS"):
    from reformer_rev import RevFormerForCausalLM

    original_forward = RevFormerForCausalLM.forward

    def slow_forward(self, *args, **kwargs):
        if not self.training:
            time.sleep(float(os.environ["PREEMPT_SLOW_EVAL_SECONDS"]))
        return original_forward(self, *args, **kwargs)

    RevFormerForCausalLM.forward = slow_forward

if __name__ == "__main__":
    script = {"lm": train_lm, "translation": train_translation}[sys.argv[1]]
    script.main(sys.argv[2:])
