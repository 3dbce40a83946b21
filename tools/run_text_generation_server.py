#!/usr/bin/env python
"""Serve a GPT-LS checkpoint over Megatron-LM's text-generation REST interface (PUT /api).

  python tools/run_text_generation_server.py --load model_dir --port 5000
  curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \\
       -d '{"prompts": ["The Python"], "tokens_to_generate": 32, "top_k": 1}'

Fields and responses are Megatron's (docs/inference.md, "Server"). A threaded HTTP server (werkzeug, Flask's)
accepts concurrent requests; generation itself runs one request at a time under a lock. ``--port 0`` picks a
free port; the line ``Serving on http://HOST:PORT`` is printed once the socket is listening.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_ls.arguments import FriendlyArgumentParser
    from megatron_ls.inference.cli_common import add_model_args

    p = FriendlyArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=5000, help="port (0: any free one)")
    s.add_argument("--max-length", type=int, default=None,
                   help="refuse requests whose longest prompt + tokens_to_generate exceeds this many tokens "
                        "(default: the learned position table, or --seq-length for RoPE/no positions)")
    s.add_argument("--max-prompts", type=int, default=128, help="prompts per request at most")
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body accepted")
    return p.parse_args(argv)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening; a bad address or a port in use is a ValueError naming both
    flags (werkzeug would print two lines of its own and exit)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} must be in [0, 65535] (0: any free port)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ValueError(f"cannot listen on --host {host} --port {port}: {exc.strerror or exc}") from None


def main(argv=None) -> None:
    args = parse_args(argv)
    from werkzeug.serving import make_server

    from megatron_ls.inference.cli_common import check_at_least, load_from_args
    from megatron_ls.inference.server import TextGenerationService, create_app

    check_at_least("--max-prompts", args.max_prompts, 1)
    check_at_least("--max-body-bytes", args.max_body_bytes, 1)
    model, config, tokenizer = load_from_args(args)
    table = config.max_position_embeddings if config.position_embedding_type == "learned" else None
    max_length = args.max_length or table or config.seq_length
    if max_length < 1 or (table is not None and max_length > table):
        raise ValueError(f"--max-length {max_length} must be in [1, {table or 'any'}] (the model's learned "
                         f"position table)")
    sock = listening_socket(args.host, args.port)
    service = TextGenerationService(model, tokenizer, max_length=max_length, max_prompts=args.max_prompts)
    app = create_app(service, max_body_bytes=args.max_body_bytes)
    server = make_server(args.host, sock.getsockname()[1], app, threaded=True, fd=sock.fileno())
    sock.close()  # the server holds its own descriptor of the socket
    print(f"Serving on http://{args.host}:{server.port} (PUT /api; max length {max_length} tokens, "
          f"tokenizer {type(tokenizer).__name__})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def cli() -> None:
    """Command-line entry: known failures end in one line ``error: ...`` and exit status 1."""
    from megatron_ls.training.faults import run_tool

    run_tool(main)


if __name__ == "__main__":
    cli()
