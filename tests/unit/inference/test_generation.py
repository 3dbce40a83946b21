"""Generation: greedy equals repeated full forward passes, sampling rules, stopping, log-probs, errors."""
import pytest
import torch

import megatron_ls.inference.generation as generation
from megatron_ls.inference.generation import generate, token_logprobs
from megatron_ls.inference.sampling import SamplingParams, sample_next, top_k_filter, top_p_filter

PROMPTS = [[5], [1, 2, 3, 4, 5, 6, 7], [9] * 8, list(range(17))]  # lengths 1, l-1, l, w+1


def _greedy_by_full_forward(model, prompt, new_tokens):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


@pytest.mark.parametrize("overrides", [dict(window_size=16, projection_rank=2),
                                       dict(window_size=0, projection_rank=1),
                                       dict(window_size=16, projection_rank=0, full_attention_layers=(0,))],
                         ids=["both", "projection_only", "window_and_full_layer"])
def test_greedy_equals_greedy_by_full_forward_passes(make_model, overrides):
    model = make_model(**overrides)
    out = generate(model, PROMPTS, 30, greedy=True)  # a batch of uneven prompts, fed in lockstep
    for prompt, tokens in zip(PROMPTS, out.tokens):
        assert tokens == _greedy_by_full_forward(model, prompt, 30)
    assert out.finish_reasons == ["length"] * 4
    assert [len(t) for t in out.generated] == [30] * 4
    alone = generate(model, PROMPTS[3], 30, greedy=True)  # batch of one: whole prompt in one prefill pass
    assert alone.tokens[0] == out.tokens[3] and alone.steps == 30


def test_top_k_one_is_greedy(make_model):
    model = make_model()
    a = generate(model, PROMPTS, 12, top_k=1, temperature=0.7, seed=3)
    b = generate(model, PROMPTS, 12, greedy=True)
    assert a.tokens == b.tokens


def test_seeded_sampling_is_reproducible(make_model):
    model = make_model(dtype=torch.float32, sharpen=False)
    for kwargs in (dict(temperature=1.5), dict(top_k=5), dict(top_p=0.9, temperature=2.0)):
        a = generate(model, PROMPTS, 20, seed=11, **kwargs)
        b = generate(model, PROMPTS, 20, seed=11, **kwargs)
        c = generate(model, PROMPTS, 20, seed=12, **kwargs)
        assert a.tokens == b.tokens, kwargs
        assert a.tokens != c.tokens, kwargs


def test_logprobs_equal_those_of_a_full_forward(make_model):
    model = make_model()
    out = generate(model, PROMPTS, 10, seed=0, top_k=4, return_logprobs=True)
    ref = token_logprobs(model, out.tokens)
    for got, want, tokens in zip(out.logprobs, ref, out.tokens):
        assert len(got) == len(tokens) - 1
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-9
    prompt_only = generate(model, PROMPTS, 0, return_logprobs=True)  # scoring without generating
    assert prompt_only.tokens == PROMPTS
    for got, want in zip(prompt_only.logprobs, token_logprobs(model, PROMPTS)):
        assert len(got) == len(want) and max((abs(a - b) for a, b in zip(got, want)), default=0) < 1e-9


def test_stops_at_eod_and_at_stop_strings(make_model):
    model = make_model()
    free = generate(model, [PROMPTS[1]], 25, greedy=True)
    generated = free.generated[0]
    eod = generated[6]
    first = generated.index(eod)
    stopped = generate(model, [PROMPTS[1]], 25, greedy=True, eod_id=eod)
    assert stopped.generated[0] == generated[:first + 1] and stopped.finish_reasons == ["eod"]

    def detok(ids):
        return "".join(chr(65 + i % 26) for i in ids)

    stop = detok(generated[4:6])
    hit = detok(generated).index(stop) + len(stop)
    by_string = generate(model, [PROMPTS[1]], 25, greedy=True, stop_strings=[stop], detokenize=detok)
    assert by_string.generated[0] == generated[:hit] and by_string.finish_reasons == ["stop"]
    # other rows of the batch go on
    mixed = generate(model, [PROMPTS[1], PROMPTS[3]], 25, greedy=True, eod_id=eod)
    assert mixed.generated[0] == generated[:first + 1]
    assert mixed.tokens[1] == generate(model, [PROMPTS[3]], 25, greedy=True, eod_id=eod).tokens[0]


def test_padded_vocabulary_is_never_sampled():
    logits = torch.zeros(3, 10)
    logits[:, 8:] = 50.0  # padded ids are the most likely
    for params in (SamplingParams(greedy=True), SamplingParams(temperature=1.0), SamplingParams(top_p=0.5)):
        assert (sample_next(logits, params, torch.Generator().manual_seed(0), vocab_size=8) < 8).all()


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(top_p_filter(logits, 0.1)).tolist() == [[False, True, True, True]]  # always one kept


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=3, top_p=0.5), "not both"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(seed=-2), "seed"),
])
def test_bad_sampling_arguments(make_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(make_model(), [1, 2], 3, **kwargs)


def test_bad_prompts_and_lengths_are_refused_before_any_work(make_model, monkeypatch):
    model = make_model(seq_length=40)

    def no_cache(*args, **kwargs):
        raise AssertionError("a cache was allocated for a request that must be refused")

    monkeypatch.setattr(generation, "new_cache", no_cache)
    with pytest.raises(ValueError, match="max-position-embeddings 40"):
        generate(model, [list(range(30))], 11)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, 9999]], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], -1)
    with pytest.raises(ValueError, match="detokenize"):
        generate(model, [[1]], 3, stop_strings=["x"])
