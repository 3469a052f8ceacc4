"""Weight tying in depth: `num_unique_layers` distinct blocks cycled over a depth chosen at run time.

Run as a script under `torchrun --nproc_per_node 2`, this file is also the DDP worker of `test_ddp_weight_tied`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_pair, max_grad_rel_err, rel_err, tiny_config
from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.profiling import peak_allocated_bytes

TIED = dict(num_hidden_layers=7, num_unique_layers=3)


def test_builds_only_the_distinct_blocks():
    tied = RevFormerForCausalLM(tiny_config(**TIED))
    untied = RevFormerForCausalLM(tiny_config(num_hidden_layers=3))
    assert len(tied.model.layers) == 3
    assert sum(p.numel() for p in tied.parameters()) == sum(p.numel() for p in untied.parameters())


def test_tied_equals_untied_stack_with_copied_blocks(padded_batch):
    """Tied model == an untied 7-layer model whose layer i is a copy of block i % 3, with dropout (float64).

    Its gradient for block j is the sum of the untied gradients of layers j, j+3, j+6.
    """
    ids, mask, labels = padded_batch
    drop = dict(hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    tied = RevFormerForCausalLM(tiny_config(**TIED, **drop)).double().train()
    untied = RevFormerForCausalLM(tiny_config(num_hidden_layers=7, **drop)).double().train()
    state = {k: v for k, v in tied.state_dict().items() if ".layers." not in k}
    for i in range(7):
        for k, v in tied.model.layers[i % 3].state_dict().items():
            state[f"model.layers.{i}.{k}"] = v
    untied.load_state_dict(state)
    losses = []
    for model in (tied, untied):
        torch.manual_seed(3)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for j in range(3):
        for name, p in tied.model.layers[j].named_parameters():
            summed = sum(untied.model.layers[i].get_parameter(name).grad for i in range(j, 7, 3))
            assert rel_err(p.grad, summed) <= 1e-10, (j, name)


def test_hidden_states_in_training_deliver_each_gradient_once_and_match_the_twin(padded_batch):
    """`output_hidden_states=True` runs the stack block by block (one engine call per application); a tied block's
    parameters still receive their gradient once per backward (`DeferredGradients`), equal to ordinary autograd's
    with a loss on every hidden state (float64, dropout on)."""
    ids, mask, labels = padded_batch
    rev, twin = make_pair(**TIED, chunk_size_feed_forward=8, hidden_dropout=0.1, attention_dropout=0.1)
    counts = {n: 0 for n, _ in rev.named_parameters()}
    for n, p in rev.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, _n=n: counts.__setitem__(_n, counts[_n] + 1))
    for model in (rev, twin):
        torch.manual_seed(3)
        out = model.train()(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        assert len(out.hidden_states) == 8
        (out.loss + sum(h.square().mean() for h in out.hidden_states[1:])).backward()
    assert set(counts.values()) == {1}, {n: c for n, c in counts.items() if c != 1}
    worst, name = max_grad_rel_err(rev, twin)
    assert worst <= 1e-10, (worst, name)


def test_float64_parity_reversible_vs_twin_weight_tied_dropout(padded_batch):
    ids, mask, labels = padded_batch
    rev, twin = make_pair(
        num_hidden_layers=12, num_unique_layers=2, hidden_dropout=0.1, attention_dropout=0.1,
        chunk_size_feed_forward=16, loss_chunk_size=13,
    )
    rev.train(), twin.train()
    for model in (rev, twin):
        torch.manual_seed(7)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    err, name = max_grad_rel_err(rev, twin)
    assert err <= 1e-10, (err, name)


def test_depth_chosen_at_run_time():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(**TIED)).eval()
    ids = torch.randint(3, 48, (2, 12))
    with torch.no_grad():
        logits = {n: model(ids, num_hidden_layers=n).logits for n in (1, 3, 7, 20)}
        assert all(torch.isfinite(v).all() for v in logits.values())
        assert rel_err(logits[20], logits[7]) > 1e-4 and rel_err(logits[1], logits[3]) > 1e-4
        model.config.num_hidden_layers = 20  # the config route gives the same model as the kwarg
        torch.testing.assert_close(model(ids).logits, logits[20], rtol=0, atol=0)
        # and training at another depth works too
    model.train()
    model(ids, labels=ids, num_hidden_layers=11).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="num_hidden_layers"):
            model(ids, num_hidden_layers=bad)


def test_untied_model_also_runs_at_another_depth():
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=3)).eval()
    ids = torch.randint(3, 48, (1, 8))
    with torch.no_grad():
        assert model(ids, num_hidden_layers=5).logits.shape == (1, 8, 48)


def test_generate_with_cache_at_a_run_time_depth():
    """Every *application* gets its own cache slot: cached generation == recomputing everything."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(**TIED)).double().eval()
    ids = torch.randint(3, 48, (2, 6))
    for depth in (7, 13):
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, num_hidden_layers=depth, use_cache=True)
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, num_hidden_layers=depth, use_cache=False)
        assert torch.equal(cached, plain)
        with torch.no_grad():
            full = model(cached, num_hidden_layers=depth).logits[:, -1]
            past = model(cached[:, :-1], num_hidden_layers=depth, use_cache=True).past_key_values
            step = model(cached[:, -1:], past_key_values=past, num_hidden_layers=depth, use_cache=True).logits[:, -1]
            assert len(past.layers) >= depth
        assert rel_err(step, full) <= 1e-12


def test_save_and_load_tied(tmp_path):
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(**TIED)).eval()
    model.save_pretrained(tmp_path)
    loaded = RevFormerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_unique_layers == 3 and len(loaded.model.layers) == 3
    ids = torch.randint(3, 48, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, num_hidden_layers=10).logits, model(ids, num_hidden_layers=10).logits)


def test_config_rejects_more_unique_than_applied_layers():
    with pytest.raises(ValueError, match="num_unique_layers"):
        tiny_config(num_hidden_layers=2, num_unique_layers=3)
    with pytest.raises(ValueError, match="num_unique_layers"):
        tiny_config(num_unique_layers=True)


def _step_peak_mb(depth: int, reversible: bool) -> float:
    torch.manual_seed(0)
    config = RevFormerConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_unique_layers=1, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=256, loss_chunk_size=128, reversible=reversible,
        hidden_dropout=0.1, attention_dropout=0.1,
    )
    model = RevFormerForCausalLM(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=False)
    ids = torch.randint(0, 256, (1, 256))

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(ids, labels=ids, num_hidden_layers=depth).loss.backward()
        opt.step()

    step()
    return peak_allocated_bytes(step) / 2**20


@pytest.mark.slow
def test_reversible_memory_flat_in_applied_depth():
    shallow, deep = _step_peak_mb(2, True), _step_peak_mb(16, True)
    assert deep <= 1.10 * shallow, (shallow, deep)
    twin_shallow, twin_deep = _step_peak_mb(2, False), _step_peak_mb(16, False)
    assert twin_deep >= 3 * twin_shallow, (twin_shallow, twin_deep)  # the measurement can see depth


# --------------------------------------------------------------------------------------------------------------
# DDP (2 processes, gloo, CPU): which mode works with weight tying + the reversible engine's backward
# --------------------------------------------------------------------------------------------------------------


def _ddp_case(variant: str, mode: str) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    configs = {
        "tied": dict(num_hidden_layers=4, num_unique_layers=2, hidden_dropout=0.1),
        "deq": dict(depth_mode="deq", num_unique_layers=1, deq_tol=1e-10, deq_max_iter=60),
    }
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(**configs[variant])).double().train()
    ref = RevFormerForCausalLM(tiny_config(**configs[variant])).double().train()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(3, 48, (4, 16), generator=torch.Generator().manual_seed(1))
    ddp = DDP(model, static_graph=(mode == "static_graph"))
    errors = []
    try:
        for step in range(2):
            model.zero_grad()
            ref.zero_grad()
            torch.manual_seed(100 * step + rank)
            part = ids[2 * rank : 2 * rank + 2]
            ddp(part, labels=part).loss.backward()
            # single-process reference: the mean of the two ranks' losses, same dropout streams
            total = 0.0
            for r in range(2):
                torch.manual_seed(100 * step + r)
                total = total + 0.5 * ref(ids[2 * r : 2 * r + 2], labels=ids[2 * r : 2 * r + 2]).loss
            total.backward()
            errors.append(max(rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())))
        return {"ok": True, "max_rel_err": max(errors)}
    except RuntimeError as err:
        return {"ok": False, "error": str(err).splitlines()[0][:200]}


def _ddp_worker() -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    # static_graph first: a failed default-mode backward leaves that DDP instance unusable, not the process group.
    cases = (("tied", "static_graph"), ("deq", "default"), ("tied", "default"))
    results = {f"{v}/{m}": _ddp_case(v, m) for v, m in cases}
    if dist.get_rank() == 0:
        print("@@DDP@@" + json.dumps(results), flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_weight_tied_and_deq_match_one_process_under_default_ddp():
    """A tied block is applied several times, so the recompute uses its parameters several times per backward. The
    engine sums those uses and delivers each parameter's gradient once (docs/design.md §2), so DDP's default mode
    (no `static_graph`, `find_unused_parameters=False`) accepts it and matches single-process training, as does
    `static_graph=True` and the DEQ implicit backward."""
    here = Path(__file__).resolve()
    pythonpath = f"{here.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(here)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@DDP@@")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(line[len("@@DDP@@"):])
    assert results["tied/static_graph"]["ok"] and results["tied/static_graph"]["max_rel_err"] <= 1e-10, results
    assert results["deq/default"]["ok"] and results["deq/default"]["max_rel_err"] <= 1e-10, results
    assert results["tied/default"]["ok"] and results["tied/default"]["max_rel_err"] <= 1e-10, results


if __name__ == "__main__":
    _ddp_worker()
