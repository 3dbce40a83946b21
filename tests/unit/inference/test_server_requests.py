"""Validation of Megatron-style ``PUT /api`` request bodies (no HTTP; the e2e tests send real requests)."""
import pytest

from megatron_ls.inference.server import RequestError, parse_request


def test_defaults_follow_megatron():
    req = parse_request({"prompts": ["hi"]})
    assert (req.tokens_to_generate, req.temperature, req.top_k, req.top_p) == (64, 1.0, 0, 0.0)
    assert req.random_seed is None and not req.logprobs and not req.add_bos and req.stop == []


def test_stop_flags_become_stop_strings():
    req = parse_request({"prompts": ["hi"], "stop_on_eol": True, "stop_on_double_eol": True, "stop": ["END"]})
    assert req.stop == ["END", "\n\n", "\n"]


@pytest.mark.parametrize("body, match", [
    ([1, 2], "JSON object"),
    ({}, "prompts argument required"),
    ({"prompts": "hi"}, "list of strings"),
    ({"prompts": ["a", 3]}, "list of strings"),
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["a"] * 129}, "at most 128"),
    ({"prompts": ["a"], "tokens_to_generate": "5"}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": True}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": -1}, "tokens_to_generate"),
    ({"prompts": ["a"], "tokens_to_generate": 0}, "logprobs"),
    ({"prompts": ["a"], "temperature": 0}, "temperature"),
    ({"prompts": ["a"], "temperature": "hot"}, "temperature"),
    ({"prompts": ["a"], "temperature": 101}, "temperature"),
    ({"prompts": ["a"], "top_k": 1.5}, "top_k"),
    ({"prompts": ["a"], "top_k": 1001}, "top_k"),
    ({"prompts": ["a"], "top_p": 1.2}, "top_p"),
    ({"prompts": ["a"], "top_p": 0.5, "top_k": 3}, "both"),
    ({"prompts": ["a"], "random_seed": -1}, "random_seed"),
    ({"prompts": ["a"], "logprobs": "yes"}, "logprobs"),
    ({"prompts": [""]}, "add_BOS"),
    ({"prompts": ["a"], "stop": "x"}, "stop"),
    ({"prompts": ["a"], "stop_token": "x"}, "stop_token"),
    ({"prompts": ["a"], "max_len": 5}, "tokens_to_generate"),
    ({"prompts": ["a"], "beam_width": 2}, "beam search"),
    ({"prompts": ["a"], "temprature": 0.5}, "unknown field"),
])
def test_bad_requests_name_the_problem(body, match):
    with pytest.raises(RequestError, match=match):
        parse_request(body)
