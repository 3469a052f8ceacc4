"""lm-evaluation-harness (`lm_eval.models.huggingface.HFLM`) scoring and generating with our models, local requests.

No task or dataset is downloaded: the requests are built by hand, as a task would build them, and the harness's
answers are compared with the same quantities computed directly from the model.
"""

from __future__ import annotations

import pytest
import torch

from client_models import BYTE_VOCAB, EOS, PAD, byte_lm_config, byte_tokenizer, seq2seq_config
from reformer_rev import RevFormerForCausalLM, RevFormerForConditionalGeneration

pytestmark = pytest.mark.slow  # importing the harness takes ~10 s

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
from lm_eval.api.instance import Instance  # noqa: E402

PAIRS = [("In the beginning God", " created"), ("And the earth was", " without form"), ("Let there be", " light")]


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def harness(model, backend: str):
    return lm_eval_hf.HFLM(pretrained=model, tokenizer=byte_tokenizer(), backend=backend, batch_size=2, device="cpu")


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))  # the byte tokenizer: id == byte


@pytest.fixture(scope="module")
def causal():
    torch.manual_seed(0)
    return RevFormerForCausalLM(byte_lm_config()).double().eval()


@pytest.fixture(scope="module")
def seq2seq():
    torch.manual_seed(0)
    cfg = seq2seq_config(vocab_size=BYTE_VOCAB, pad_token_id=PAD, bos_token_id=PAD + 1, eos_token_id=EOS,
                         decoder_start_token_id=PAD + 1)
    return RevFormerForConditionalGeneration(cfg).double().eval()


def test_causal_loglikelihood(causal):
    results = harness(causal, "causal").loglikelihood(requests("loglikelihood", PAIRS))
    assert len(results) == len(PAIRS)
    for (context, continuation), (logprob, is_greedy) in zip(PAIRS, results):
        ids = torch.tensor([encode(context) + encode(continuation)])
        n = len(encode(continuation))
        with torch.no_grad():
            logp = causal(ids[:, :-1]).logits.log_softmax(-1)[0, -n:]
        target = ids[0, -n:]
        assert logprob == pytest.approx(logp.gather(-1, target[:, None]).sum().item(), rel=1e-6)
        assert is_greedy == bool((logp.argmax(-1) == target).all())


def test_causal_generate_until(causal):
    until = "\n\n"
    gen_args = {"until": [until], "max_gen_toks": 10, "do_sample": False}
    contexts = [c for c, _ in PAIRS]
    results = harness(causal, "causal").generate_until(requests("generate_until", [(c, gen_args) for c in contexts]))
    tok = byte_tokenizer()
    for context, text in zip(contexts, results):
        with torch.no_grad():
            out = causal.generate(torch.tensor([encode(context)]), max_new_tokens=10, do_sample=False, use_cache=False,
                                  pad_token_id=PAD)
        expected = tok.decode(out[0, len(encode(context)):], skip_special_tokens=True).split(until)[0]
        assert text == expected


def test_seq2seq_loglikelihood(seq2seq):
    """The harness scores the continuation as decoder labels: the model must return logits with them."""
    results = harness(seq2seq, "seq2seq").loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, _) in zip(PAIRS, results):
        src, target = torch.tensor([encode(context)]), torch.tensor([encode(continuation)])
        with torch.no_grad():
            out = seq2seq(input_ids=src, decoder_input_ids=seq2seq.prepare_decoder_input_ids_from_labels(target))
        logp = out.logits.log_softmax(-1)[0]
        assert logprob == pytest.approx(logp.gather(-1, target[0, :, None]).sum().item(), rel=1e-6)


def test_seq2seq_generate_until(seq2seq):
    # For an encoder-decoder the harness asks for `max_length = padded context length + max_gen_toks` decoder tokens;
    # contexts of one length keep that the same for every row.
    contexts = [c[:12] for c, _ in PAIRS]
    gen_args = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    results = harness(seq2seq, "seq2seq").generate_until(requests("generate_until", [(c, gen_args) for c in contexts]))
    tok = byte_tokenizer()
    for context, text in zip(contexts, results):
        with torch.no_grad():
            out = seq2seq.generate(input_ids=torch.tensor([encode(context)]), max_length=12 + 8, do_sample=False,
                                   use_cache=False)
        assert text == tok.decode(out[0], skip_special_tokens=True).split("\n\n")[0]


def test_backend_is_detected_from_the_config(causal, seq2seq, tmp_path):
    """Without `backend=`, HFLM picks causal or seq2seq by the config's `model_type` (an encoder-decoder config reports
    `reformer_rev_seq2seq`), for a model object and for a saved checkpoint loaded by path."""
    seq2seq.save_pretrained(tmp_path / "seq2seq")
    causal.save_pretrained(tmp_path / "causal")
    for model, path, backend, cls in (
        (seq2seq, tmp_path / "seq2seq", "seq2seq", RevFormerForConditionalGeneration),
        (causal, tmp_path / "causal", "causal", RevFormerForCausalLM),
    ):
        expected = harness(model, backend).loglikelihood(requests("loglikelihood", PAIRS))
        for pretrained in (model, str(path)):
            lm = lm_eval_hf.HFLM(pretrained=pretrained, tokenizer=byte_tokenizer(), batch_size=2, device="cpu",
                                 dtype="float64")
            assert lm.backend == backend and type(lm.model) is cls
            got = lm.loglikelihood(requests("loglikelihood", PAIRS))
            assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], rel=1e-9)
