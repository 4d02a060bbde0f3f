"""``llmswarm gateway``: the OpenAI-compatible API and chat page in front of a swarm.

``add_gateway_command(subparsers)`` adds the subcommand to the ``llmswarm`` parser;
``python -m llmswarm.gateway`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from llmswarm.gateway.options import DEFAULT_PORT, GatewayOptions
from llmswarm_core.defaults import FLOAT_DTYPES

TOKEN_ENV = "LLMSWARM_TOKEN"  # the swarm credential (--swarm-token)
API_KEY_ENV = "LLMSWARM_GATEWAY_TOKEN"  # the one API key (--token): never the swarm credential


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GatewayOptions(swarm="")
    parser.add_argument("--swarm", required=True, help="route-map URL of the swarm")
    parser.add_argument("--model", default=defaults.model,
                        help="model SPEC for the client's local part (directory, .gguf, org/name or smollm2)")
    parser.add_argument("--host", default=defaults.host, help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free port)")
    parser.add_argument("--token", help=f"one API key clients must send as a bearer token (default: ${API_KEY_ENV})")
    parser.add_argument("--api-keys", metavar="FILE", help="API keys file: many hashed, revocable keys with rate limits "
                        "(see `llmswarm gateway-keys`)")
    parser.add_argument("--swarm-token", help=f"the gateway's credential for the swarm (default: ${TOKEN_ENV}); never a client's key")
    parser.add_argument("--served-model-name", help="the model name clients use (default: the route map's model name)")
    parser.add_argument("--wire-dtype", choices=FLOAT_DTYPES, default=defaults.wire_dtype,
                        help="dtype of hidden states on the wire")
    parser.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent, help="generations running at once")
    parser.add_argument("--max-queued", type=int, default=defaults.max_queued, help="requests waiting for a slot before 429")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="most completion tokens per request")
    parser.add_argument("--context-length", type=int, default=None, help="prompt + completion tokens (default: the model's)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="largest request body")
    parser.add_argument("--write-timeout", type=float, default=defaults.write_timeout,
                        help="seconds a stream waits for a client that does not read before dropping it")
    parser.add_argument("--allowed-host", action="append", default=[], dest="allowed_hosts", metavar="NAME",
                        help="a Host name a gateway without --token answers to on a loopback address, besides localhost"
                             " (repeatable; '*' for any)")


def add_gateway_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `gateway` to an argparse subparsers object (the `llmswarm` command's)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", help="serve an OpenAI-compatible API and a chat page in front of a swarm")
    add_gateway_arguments(parser)
    parser.set_defaults(func=run_gateway)
    return parser


def options_from_args(args: argparse.Namespace) -> GatewayOptions:
    return GatewayOptions(
        swarm=args.swarm, model=args.model, host=args.host, port=args.port,
        token=args.token or os.environ.get(API_KEY_ENV) or None, api_keys=args.api_keys,
        swarm_token=args.swarm_token or os.environ.get(TOKEN_ENV) or None,
        served_model_name=args.served_model_name,
        wire_dtype=args.wire_dtype, max_concurrent=args.max_concurrent, max_queued=args.max_queued,
        max_tokens=args.max_tokens, context_length=args.context_length, max_body_bytes=args.max_body_bytes,
        write_timeout=args.write_timeout, allowed_hosts=tuple(args.allowed_hosts),
    )


async def _serve(options: GatewayOptions) -> None:
    from llmswarm.gateway.app import Gateway

    gateway = Gateway(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = await gateway.start()
    print(f"gateway: {url}  (OpenAI API at {url}/v1, chat page at {url}/)", flush=True)
    try:
        await stop.wait()
    finally:
        print("stopping the gateway", file=sys.stderr, flush=True)
        await gateway.stop()


def run_gateway(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = options_from_args(args)
        options.validate()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(options))
    except OSError as error:  # cannot listen
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmswarm gateway", description="OpenAI-compatible API and chat page for a swarm.")
    add_gateway_arguments(parser)
    return run_gateway(parser.parse_args(argv))
