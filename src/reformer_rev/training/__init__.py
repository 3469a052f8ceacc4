"""The training skeleton shared by `training/train_lm.py` and `training/train_translation.py` (and usable in your own
Accelerate loop): each piece exists once here.

* `state`: `TrainingState`, the counters and data position of a run (JSON).
* `loop`: `TrainingLoop` (micro-batches, accumulation, stop at a step boundary), `GuardedStep` (clipping and the
  all-process NaN/inf decision), `TrainLog` (`train_log.jsonl`).
* `budget`: `TimeBudget` from process start, `BudgetedSchedule` (warmup + decay whose end can move), `StepFitter`.
* `checkpointing`: `CheckpointManager` (atomic, manifest-verified, pickle-free checkpoints with fallback to the newest
  valid one), `output_dir_lock` (one run per folder).
* `cli`: the option table (`Option`, `OptionParser`: `--help` and the defaults from one row per option), `RevFormerConfig`
  fields as options, `config_from_args`, Accelerator and optimizer.
* `models`: where the model comes from (new config or a registered loader per checkpoint `model_type`).
* `corpus`, `tokenization`, `translation`: the bundled data, tokenizers, translation data and metrics.
* `reporting`: loss-curve PNG and a generated sample.

Atomic files and folder locks come from the flat `reformer_rev.safe_io` (which the modeling files use too).
The modeling files never import this package.
"""
