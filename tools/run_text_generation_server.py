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
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_ls.inference.cli_common import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv=None) -> None:
    args = parse_args(argv)
    from werkzeug.serving import make_server

    from megatron_ls.inference.checkpoint_io import InferenceCheckpointError
    from megatron_ls.inference.cli_common import load_from_args
    from megatron_ls.inference.server import TextGenerationService, create_app

    try:
        model, config, tokenizer = load_from_args(args)
        table = config.max_position_embeddings if config.position_embedding_type == "learned" else None
        max_length = args.max_length or table or config.seq_length
        if max_length < 1 or (table is not None and max_length > table):
            raise ValueError(f"--max-length {max_length} must be in [1, {table or 'any'}] (the model's learned "
                             f"position table)")
        if args.max_prompts < 1:
            raise ValueError(f"--max-prompts must be >= 1, got {args.max_prompts}")
    except (ValueError, InferenceCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    service = TextGenerationService(model, tokenizer, max_length=max_length, max_prompts=args.max_prompts)
    app = create_app(service, max_body_bytes=args.max_body_bytes)
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"Serving on http://{args.host}:{server.server_port} (PUT /api; max length {max_length} tokens, "
          f"tokenizer {type(tokenizer).__name__})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
