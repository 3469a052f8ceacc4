"""Multi-process correctness on CPU (gloo): DDP through Accelerate and FSDP2 `fully_shard` vs one process.

`accelerate launch --cpu --num_processes 2` starts a single process (docs/design.md §4), so the workers in
`tests/distributed/` are started with `torchrun --nproc_per_node 2` (Accelerate with `cpu=True` then runs real DDP).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "distributed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path | str, *args: str, tmp_path: Path, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(script), *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def run_worker(name: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    torchrun(WORKERS / name, str(out), tmp_path=tmp_path)
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))  # the measured errors, visible with `pytest -s`
    return result


@pytest.mark.slow
def test_ddp_accelerate_grad_accumulation_matches_single_process(tmp_path):
    result = run_worker("ddp_parity.py", tmp_path)
    for run in result["runs"]:
        assert run["num_processes"] == 2 and run["ddp_wrapped"] == "DistributedDataParallel"
        assert run["distributed_type"].endswith("MULTI_CPU")
        assert run["distinct_blocks_seen"] == run["num_blocks"]  # the two ranks saw disjoint halves of the data
        assert run["max_abs_diff_across_ranks"] == 0.0
        assert run["update_to_param_norm"] > 1e-2  # the steps really moved the weights
    sgd, adamw = result["runs"]
    assert sgd["param_rel_err"] <= 1e-6, sgd
    assert sgd["update_rel_err"] <= 2e-5, sgd
    # Adam divides every gradient element by its own magnitude, so elements whose gradient is at the fp32 noise floor
    # of the all-reduce order move by O(lr) either way: looser bound, measured ~4e-6.
    assert adamw["param_rel_err"] <= 2e-5, adamw


@pytest.mark.slow
def test_fsdp2_fully_shard_blocks_one_step_matches_single_process(tmp_path):
    result = run_worker("fsdp_parity.py", tmp_path)
    assert result["world_size"] == 2
    for run in result["runs"]:
        assert run["fsdp_blocks"] == run["patched_blocks"] == 3
        assert run["sharded_params"] == run["num_params"]  # every parameter is a sharded DTensor after the step
        assert run["loss_rel_err"] <= 1e-6
        assert run["update_to_param_norm"] > 1e-3
    sgd, adamw = result["runs"]
    assert sgd["param_rel_err"] <= 1e-6, sgd
    assert sgd["update_rel_err"] <= 2e-5, sgd
    assert adamw["param_rel_err"] <= 1e-6, adamw


@pytest.mark.slow
def test_train_lm_script_under_two_process_ddp(tmp_path):
    """The real script under torchrun: 2 ranks, accumulation, checkpoints, results and a loadable model."""
    text = "\n".join(f"Verse {i}: and the earth was without form, and void; and darkness was upon the deep." for i in range(300))
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text[:3000])
    out = tmp_path / "out"
    torchrun(
        REPO / "training" / "train_lm.py",
        "--train_file", "train.txt", "--validation_file", "valid.txt", "--output_dir", str(out), "--cpu",
        "--block_size", "64", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--intermediate_size", "64", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "6", "--num_warmup_steps", "1", "--eval_steps", "3", "--checkpointing_steps", "3",
        "--time_budget_minutes", "0", "--learning_rate", "1e-2",
        tmp_path=tmp_path,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["train"]["steps"] == 6
    assert results["train"]["tokens"] == 6 * 2 * 2 * 2 * 64
    assert results["validation"]["loss"] < results["eval_history"][0]["loss"] + 1.0
    assert [p.name for p in (out / "checkpoints").iterdir()] and (out / "checkpoints" / "step_6" / "rng_state_1.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_accelerate_configs_parse_and_wrap_the_reversible_block():
    from accelerate.commands.config.config_args import load_config_from_file

    from reformer_rev.modeling_reformer_rev import RevFormerBlock, RevFormerPreTrainedModel

    configs = REPO / "training" / "configs"
    ddp = load_config_from_file(str(configs / "ddp.yaml"))
    assert str(ddp.distributed_type).endswith("MULTI_GPU") and ddp.num_processes >= 2
    fsdp = load_config_from_file(str(configs / "fsdp.yaml"))
    assert str(fsdp.distributed_type).endswith("FSDP")
    assert fsdp.fsdp_config["fsdp_version"] == 2
    wrap = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert wrap == RevFormerBlock.__name__ and wrap in RevFormerPreTrainedModel._no_split_modules
