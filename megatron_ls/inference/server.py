"""Megatron-LM's text-generation REST interface (``PUT /api``) on Flask, over the Long-Short decoding cache.

Request JSON (Megatron's names): ``prompts`` (list of 1..max_prompts strings, required), ``tokens_to_generate``
(int >= 0, default 64), ``temperature`` (0 < t <= 100, default 1), ``top_k`` (0..1000; 1 = greedy),
``top_p`` (0..1; not with top_k), ``random_seed`` (int >= 0), ``logprobs`` (bool), ``add_BOS`` (bool: prepend the
end-of-document token, which also makes an empty prompt valid), ``stop_on_eol`` / ``stop_on_double_eol`` (bool),
``stop_token`` (int, default the tokenizer's EOD), and our extension ``stop`` (list of stop strings).
Response: ``text`` (prompt + continuation), ``segments`` (each token's text), ``tokens`` and, with ``logprobs``,
``logprobs`` (log-probability of every token after the first). A bad request gets HTTP 400 with
``{"error": message}``; a request whose longest prompt plus ``tokens_to_generate`` exceeds the server's limit is
refused before anything is allocated. Generation is serialised by a lock, so concurrent requests are safe.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, List, Optional

from megatron_ls.inference.generation import generate

_DEPRECATED = {"max_len": "max_len is no longer used; replace it with tokens_to_generate",
               "sentences": "sentences is no longer used; replace it with prompts",
               "beam_width": "beam search is not supported"}
_KNOWN = {"prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "random_seed", "logprobs", "add_BOS",
          "stop_on_eol", "stop_on_double_eol", "stop_token", "stop"}


class RequestError(ValueError):
    """A request the server refuses with HTTP 400; the message says which field is wrong and why."""


@dataclass
class GenerateRequest:
    """A validated ``PUT /api`` request."""

    prompts: List[str]
    tokens_to_generate: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    random_seed: Optional[int] = None
    logprobs: bool = False
    add_bos: bool = False
    stop_token: Optional[int] = None
    stop: List[str] = field(default_factory=list)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get_bool(payload: dict, name: str) -> bool:
    value = payload.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean (true/false), got {value!r}")
    return value


def parse_request(payload: Any, *, max_prompts: int = 128) -> GenerateRequest:
    """Validate a request body (already JSON-decoded) against Megatron's rules; ``RequestError`` if bad."""
    if not isinstance(payload, dict):
        raise RequestError("request body must be a JSON object")
    for name, message in _DEPRECATED.items():
        if name in payload:
            raise RequestError(message)
    unknown = sorted(set(payload) - _KNOWN)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; accepted: {sorted(_KNOWN)}")
    if "prompts" not in payload:
        raise RequestError("prompts argument required")
    prompts = payload["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts must be a list of strings")
    if not prompts:
        raise RequestError("prompts is empty")
    if len(prompts) > max_prompts:
        raise RequestError(f"at most {max_prompts} prompts per request, got {len(prompts)}")
    req = GenerateRequest(prompts=prompts)
    req.tokens_to_generate = payload.get("tokens_to_generate", 64)
    if not _is_int(req.tokens_to_generate) or req.tokens_to_generate < 0:
        raise RequestError(f"tokens_to_generate must be an integer >= 0, got {req.tokens_to_generate!r}")
    req.logprobs = _get_bool(payload, "logprobs")
    if req.tokens_to_generate == 0 and not req.logprobs:
        raise RequestError("tokens_to_generate=0 implies logprobs should be true")
    req.temperature = payload.get("temperature", 1.0)
    if not _is_number(req.temperature) or not 0.0 < req.temperature <= 100.0:
        raise RequestError(f"temperature must be a number > 0 and <= 100, got {req.temperature!r}")
    req.top_k = payload.get("top_k", 0)
    if not _is_int(req.top_k) or not 0 <= req.top_k <= 1000:
        raise RequestError(f"top_k must be an integer in [0, 1000], got {req.top_k!r}")
    req.top_p = payload.get("top_p", 0.0)
    if not _is_number(req.top_p) or not 0.0 <= req.top_p <= 1.0:
        raise RequestError(f"top_p must be a number in [0, 1], got {req.top_p!r}")
    if req.top_k > 0 and req.top_p > 0.0:
        raise RequestError("cannot set both top_k and top_p")
    seed = payload.get("random_seed", None)
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RequestError(f"random_seed must be an integer >= 0, got {seed!r}")
    req.random_seed = seed
    req.add_bos = _get_bool(payload, "add_BOS")
    if any(not p for p in prompts) and not req.add_bos:
        raise RequestError("empty prompts require add_BOS=true")
    req.stop_token = payload.get("stop_token", None)
    if req.stop_token is not None and not _is_int(req.stop_token):
        raise RequestError(f"stop_token must be an integer, got {req.stop_token!r}")
    stop = payload.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a list of non-empty strings")
    req.stop = list(stop)
    if _get_bool(payload, "stop_on_double_eol"):
        req.stop.append("\n\n")
    if _get_bool(payload, "stop_on_eol"):
        req.stop.append("\n")
    return req


class TextGenerationService:
    """Tokenize, check limits, generate under a lock, and build Megatron's response."""

    def __init__(self, model, tokenizer, *, max_length: int, max_prompts: int = 128) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.max_prompts = max_length, max_prompts
        self.lock = threading.Lock()

    def tokenize(self, req: GenerateRequest) -> List[List[int]]:
        """Token ids of every prompt; ``RequestError`` when the longest one plus the new tokens is too long."""
        rows = []
        for i, prompt in enumerate(req.prompts):
            try:
                ids = self.tokenizer.tokenize(prompt)
            except ValueError as exc:
                raise RequestError(f"prompt {i} cannot be tokenized: {exc}") from None
            if req.add_bos:
                ids = [self.tokenizer.eod] + ids
            if len(ids) + req.tokens_to_generate > self.max_length:
                raise RequestError(f"request too long: prompt {i} has {len(ids)} tokens + tokens_to_generate "
                                   f"{req.tokens_to_generate} > the server's limit of {self.max_length} tokens")
            rows.append(ids)
        return rows

    def handle(self, payload: Any) -> dict:
        """The response for one request body (``RequestError`` for a bad one)."""
        req = parse_request(payload, max_prompts=self.max_prompts)
        rows = self.tokenize(req)
        eod = self.tokenizer.eod if req.stop_token is None else req.stop_token
        with self.lock:
            try:
                out = generate(self.model, rows, req.tokens_to_generate, temperature=req.temperature,
                               top_k=req.top_k, top_p=req.top_p, seed=req.random_seed, eod_id=eod,
                               stop_strings=req.stop, detokenize=self.tokenizer.detokenize,
                               return_logprobs=req.logprobs, vocab_size=self.tokenizer.vocab_size)
            except ValueError as exc:  # e.g. a token id outside the model's vocabulary
                raise RequestError(str(exc)) from None
        detok = self.tokenizer.detokenize
        response = {
            "text": [p + detok(g) for p, g in zip(req.prompts, out.generated)],
            "segments": [[detok([t]) for t in toks] for toks in out.tokens],
            "tokens": out.tokens,
        }
        if req.logprobs:
            response["logprobs"] = out.logprobs
        return response


def create_app(service: TextGenerationService, *, max_body_bytes: int = 4 << 20):
    """The Flask application: ``PUT /api`` (Megatron's endpoint) and ``GET /health``."""
    from flask import Flask, jsonify, request

    app = Flask("megatron_ls_text_generation")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes

    @app.put("/api")
    def api():
        payload = request.get_json(force=True, silent=True)
        if payload is None:
            return jsonify(error="request body is not valid JSON (expected an object with 'prompts')"), 400
        try:
            return jsonify(service.handle(payload))
        except RequestError as exc:
            return jsonify(error=str(exc)), 400
        except Exception as exc:  # noqa: BLE001 - keep serving; report what failed
            app.logger.exception("generation failed")
            return jsonify(error=f"generation failed: {type(exc).__name__}: {exc}"), 500

    @app.get("/health")
    def health():
        return jsonify(status="ok", max_length=service.max_length)

    @app.errorhandler(413)
    def too_large(_exc):
        return jsonify(error=f"request body larger than {max_body_bytes} bytes"), 413

    return app
