"""Static caches (`StaticCache`, `cache_implementation="static"`, the deprecated `"sliding_window"`) decode the same
tokens as the default dynamic cache, for both model classes; `torch.compile` of the decode step works; a cache the
model cannot use is refused with the list of those it can."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, StaticCache

from client_models import seq2seq_config
from conftest import tiny_config
from reformer_rev import RevFormerForCausalLM, RevFormerForConditionalGeneration

DECODING = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, temperature=1.5),
    "beam": dict(num_beams=3, do_sample=False),
}


def _models():
    torch.manual_seed(0)
    causal = RevFormerForCausalLM(tiny_config(eos_token_id=None)).eval()
    seq2seq = RevFormerForConditionalGeneration(seq2seq_config(eos_token_id=None)).eval()
    return {"causal": causal, "seq2seq": seq2seq}


MODELS = _models()


def _prompt():
    ids = torch.randint(3, 48, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model, decoding, **kwargs):
    ids, mask = _prompt()
    torch.manual_seed(11)  # sampling draws the same numbers whatever the cache
    return model.generate(ids, attention_mask=mask, max_new_tokens=9, **DECODING[decoding], **kwargs)


@pytest.mark.parametrize("decoding", DECODING)
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("implementation", ["static", "sliding_window"])
def test_static_cache_implementations_decode_like_the_dynamic_cache(kind, decoding, implementation):
    model = MODELS[kind]
    expected = _generate(model, decoding)
    assert torch.equal(_generate(model, decoding, cache_implementation=implementation), expected)


@pytest.mark.parametrize("decoding", DECODING)
def test_explicit_static_cache_decodes_like_the_dynamic_cache(decoding):
    model = MODELS["causal"]
    cache = StaticCache(config=model.config, max_cache_len=32)
    assert torch.equal(_generate(model, decoding, past_key_values=cache), _generate(model, decoding))
    assert int(cache.get_seq_length()) == 7 + 9 - 1  # the last token is sampled, not fed back


def test_static_cache_logits_equal_the_full_forward():
    """Step by step through a static cache with left padding: every step's logits are those of the full forward."""
    model = MODELS["causal"]
    ids, mask = _prompt()
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        steps = [model(ids[:, :4], attention_mask=mask[:, :4], cache=cache).logits]
        for t in range(4, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    got = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match=r"static cache holds 16 positions.*larger `max_cache_len`"):
        model(torch.randint(3, 48, (2, 10)), cache=cache)


def test_a_cache_the_model_cannot_use_is_refused_by_name():
    model = MODELS["causal"]
    sliding = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=4) for _ in range(3)])
    with torch.no_grad(), pytest.raises(ValueError, match=r"DynamicSlidingWindowLayer layers.*Supported caches: "
                                                          r"DynamicCache .*StaticCache"):
        model(torch.randint(3, 48, (1, 5)), cache=sliding)
    deeper = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad(), pytest.raises(ValueError, match=r"static cache has 3 layers, but this forward applies more blocks"):
        model(torch.randint(3, 48, (1, 5)), cache=deeper, num_hidden_layers=5)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    """`torch.compile` of the forward, decoding through a static cache (the compile-friendly one): same tokens."""
    torch.manual_seed(0)
    model = RevFormerForCausalLM(tiny_config(num_hidden_layers=2, eos_token_id=None)).eval()
    ids = torch.randint(3, 48, (1, 6))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.forward = torch.compile(model.forward)
    for _ in range(2):  # compiles, then reuses the compiled graphs
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static"),
                           expected)
