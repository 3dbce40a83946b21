"""tools/run_text_generation_server.py: real HTTP requests (loopback only) against a running server process."""
import json
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.e2e.conftest import REPO, cli_env
from tests.e2e.inference_checkpoints import write_checkpoints

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, consolidated checkpoint dir) of a server on a free loopback port; stopped afterwards."""
    consolidated, _ = write_checkpoints(tmp_path_factory.mktemp("server_ckpt"))
    proc = subprocess.Popen([sys.executable, "tools/run_text_generation_server.py", "--load", consolidated,
                             "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--max-prompts", "8"],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, seen, deadline = None, [], time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("Serving on "):
            url = line.split()[2]
            break
    if url is None:
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(seen))
    # keep draining the server's log so it never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    try:
        yield url, consolidated
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def put(url, body, **kwargs):
    return requests.put(url + "/api", json=body, timeout=120, **kwargs)


def test_greedy_response_matches_the_python_api(server):
    url, ckpt = server
    prompts = ["Hello", "A longer prompt, fed in lockstep"]
    r = put(url, {"prompts": prompts, "tokens_to_generate": 10, "top_k": 1, "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "segments", "tokens", "logprobs"}

    from megatron_ls.data.tokenizers import ByteTokenizer
    from megatron_ls.inference.generation import generate
    from megatron_ls.inference.loading import load_model_for_inference

    model, _, _ = load_model_for_inference(ckpt)
    tok = ByteTokenizer()
    want = generate(model, [tok.tokenize(p) for p in prompts], 10, greedy=True, eod_id=tok.eod,
                    return_logprobs=True, vocab_size=tok.vocab_size)
    assert body["tokens"] == want.tokens
    for i, prompt in enumerate(prompts):
        assert body["text"][i] == prompt + tok.detokenize(want.generated[i])
        assert len(body["segments"][i]) == len(body["tokens"][i])
        assert len(body["logprobs"][i]) == len(body["tokens"][i]) - 1
        assert max(abs(a - b) for a, b in zip(body["logprobs"][i], want.logprobs[i])) < 1e-4


def test_concurrent_requests_are_served_one_generation_at_a_time(server):
    url, _ = server
    bodies = [{"prompts": [f"prompt {i}"], "tokens_to_generate": 12, "top_k": 8, "random_seed": 100 + i}
              for i in range(6)]
    results = [None] * len(bodies)

    def send(i):
        results[i] = put(url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r.status_code == 200 for r in results), [getattr(r, "text", r) for r in results]
    # the same seeds sent one after another give the same answers: no request disturbed another
    for body, r in zip(bodies, results):
        assert put(url, body).json()["tokens"] == r.json()["tokens"]


@pytest.mark.parametrize("body, match", [
    ({"prompts": "Hello"}, "list of strings"),
    ({"prompts": ["Hello"], "tokens_to_generate": "5"}, "tokens_to_generate"),
    ({"prompts": ["Hello"], "temperature": "hot"}, "temperature"),
    ({"prompts": ["Hello"], "top_k": 2.5}, "top_k"),
    ({"prompts": ["Hello"], "logprobs": 1}, "logprobs"),
    ({"prompts": ["Hello"], "random_seed": "x"}, "random_seed"),
    ({"prompts": [""]}, "add_BOS"),
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["a"] * 9}, "at most 8"),
    ({"prompts": ["Hello"], "tokens_to_generate": 10 ** 9}, "too long"),
    ({"prompts": ["x" * 200]}, "too long"),
])
def test_bad_requests_get_400_with_a_message(server, body, match):
    url, _ = server
    start = time.monotonic()
    r = put(url, body)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]
    assert time.monotonic() - start < 10  # refused up front, nothing generated


def test_malformed_bodies_and_methods(server):
    url, _ = server
    for data in (b"{not json", b"", b"\xff\xfe", b"[1, 2]", b"null"):
        r = requests.put(url + "/api", data=data, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "error" in r.json(), (data, r.text)
    assert requests.get(url + "/api", timeout=30).status_code == 405
    huge = json.dumps({"prompts": ["a" * (5 << 20)]})
    assert requests.put(url + "/api", data=huge, timeout=60).status_code == 413


def test_empty_prompt_with_bos_and_server_survives(server):
    url, _ = server
    r = put(url, {"prompts": [""], "add_BOS": True, "tokens_to_generate": 3, "top_k": 1})
    assert r.status_code == 200 and 2 <= len(r.json()["tokens"][0]) <= 4  # BOS + up to 3 new (EOD stops)
    r = put(url, {"prompts": ["ab"], "tokens_to_generate": 0, "logprobs": True})
    assert r.status_code == 200 and len(r.json()["logprobs"][0]) == 1
    assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"
