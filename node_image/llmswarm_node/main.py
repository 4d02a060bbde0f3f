"""``llmswarm serve``: load one span and serve it (what the node image runs)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys

from llmswarm_core.defaults import DEFAULT_MODEL, FLOAT_DTYPES
from llmswarm_core.security import AUTHORITY_ENV, TOKEN_ENV, authority_from_env, token_from_env
from llmswarm_node.batch_policy import BatchOptions
from llmswarm_node.lora import LoraLimits
from llmswarm_node.sessions import ServerLimits


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help=f"swarm token required on every RPC (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--tls-ca", help="CA bundle (PEM) to verify https peers (route map) against")
    parser.add_argument("--authority-key", help="the public key that signs the swarm's credentials (llmswarm "
                                                "credentials): requests need one holding the use role, or the token "
                                                f"(default: ${AUTHORITY_ENV})")


def add_identity_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identity-file", help="the server's Ed25519 key (PEM), created with mode 0600 on first start "
                                                "and kept: its announcements are signed with it, and without "
                                                "--server-id its id derives from it (default: with --server-id, "
                                                "$LLMSWARM_CACHE/identities/SERVER_ID.pem, so that a restarted server "
                                                "speaks for its id again; without, a new key and id each start)")


def identity_file(args: argparse.Namespace) -> str | None:
    """The key file to use: the one given, else one per --server-id in the cache, else none (a new key)."""
    if args.identity_file or not args.server_id:
        return args.identity_file
    from llmswarm_core.source import cache_root

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", args.server_id) or args.server_id.startswith("."):
        raise SystemExit(f"error: --server-id {args.server_id!r} cannot name a key file: give --identity-file")
    return str(cache_root() / "identities" / f"{args.server_id}.pem")


def parse_adapter(text: str) -> str:
    name, _, path = text.partition("=")
    if not name or not path or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with NAME of letters, digits, _.-, got {text!r}")
    return text


def parse_span(text: str) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"span {text!r} must satisfy 0 <= START < END")
    return start, end


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerLimits()
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model SPEC (directory, .gguf, org/name or smollm2)")
    parser.add_argument("--blocks", type=parse_span, required=True, metavar="START:END", help="span [START, END)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument("--public-url", help="URL clients use to reach this server (default http://HOST:PORT)")
    parser.add_argument("--swarm", "--join", dest="swarm",
                        help="route-map URL to announce this server to (--join: a swarm elsewhere, e.g. a Kubernetes "
                             "Swarm's public route map; give --public-url, the address its clients reach this server "
                             "at, and a credential holding use and join as --token)")
    parser.add_argument("--relay", action="store_true",
                        help="with --join: serve through the route map's relay (it must run with --relay): the server "
                             "dials out and is listed at the route map's address, for a machine nobody can connect to "
                             "(behind NAT or a firewall); it reaches the other servers through the relay too")
    parser.add_argument("--server-id", help="stable id in the route map (default: the id of the server's key, srv-...; "
                             "a named id belongs to the first key "
                             "that announces it, for the route map's life)")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32", help="compute dtype of the blocks")
    parser.add_argument("--device", help="torch device for the blocks (default: cuda when available, else cpu)")
    parser.add_argument("--quantization", choices=("none", "int8", "nf4"), default="none",
                        help="quantize the blocks' linear layers with bitsandbytes (fits more blocks in memory)")
    parser.add_argument("--served-model-name", help="the model's name in the route map (default: the SPEC's, e.g. a "
                                                    "directory's last component): every server of a swarm gives the same")
    parser.add_argument("--adapters", nargs="*", action="extend", default=[], type=parse_adapter, metavar="NAME=PATH",
                        help="PEFT LoRA adapters that clients can select by name: PATH a directory, or "
                             "hub:ORG/NAME[@REVISION] from the Hugging Face Hub (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for prefill and bulk work (0: torch's default)")
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="torch threads for decode steps of a few tokens (0: same as --threads)")
    parser.add_argument("--max-sessions", type=int, default=defaults.max_sessions)
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per session")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--max-tokens-per-request", type=int, default=defaults.max_tokens_per_request)
    parser.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes)
    parser.add_argument("--kv-cache-bytes", type=int, default=defaults.kv_cache_bytes)
    parser.add_argument("--session-idle-timeout", type=float, default=defaults.session_idle_timeout)
    add_bound_arguments(parser, defaults)
    lora = LoraLimits()
    parser.add_argument("--max-lora-rank", type=int, default=lora.max_rank, help="highest rank of a client's LoRA weights")
    parser.add_argument("--max-lora-bytes", type=int, default=lora.max_request_bytes,
                        help="bytes of a client's LoRA weights in one request or session")
    parser.add_argument("--lora-session-bytes", type=int, default=lora.session_bytes,
                        help="bytes of LoRA weights that all open sessions may hold together")
    parser.add_argument("--published-adapter-bytes", type=int, default=lora.published_bytes,
                        help="bytes of published adapters (fetched from the route map by name) kept for this span")
    batching = BatchOptions()
    parser.add_argument("--max-batch-rows", type=int, default=batching.max_batch_rows,
                        help="rows (sessions x batch) in one batched decode pass")
    parser.add_argument("--max-batch-tokens", type=int, default=batching.max_batch_tokens, help="tokens in one pass")
    parser.add_argument("--batch-wait-ms", type=float, default=batching.batch_wait * 1000,
                        help="how long a step may wait for companions to batch with")
    parser.add_argument("--prefill-chunk", type=int, default=batching.prefill_chunk,
                        help="long steps run this many tokens per pass, so decode steps of others keep flowing")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds open sessions may take to finish before the server exits")
    add_security_arguments(parser)
    add_identity_argument(parser)
    parser.add_argument("--no-push", dest="push", action="store_false",
                        help="never push a step's output to the next server (clients then send it on themselves)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_bound_arguments(parser: argparse.ArgumentParser, defaults: ServerLimits) -> None:
    """What the server takes at once from all clients and from each (refused past them: ``overloaded`` with
    Retry-After, or ``too_large`` for what never fits), and how long it waits for a client."""
    mib = 1024**2
    parser.add_argument("--compute-memory-bytes", type=int, default=defaults.compute_memory_bytes,
                        help="memory one pass through the blocks may take beyond weights and caches, estimated before "
                             "it runs: steps run in smaller chunks, forwards in fewer rows, backwards block by block, "
                             "batched decode in smaller groups; what does not fit even so is refused as too_large "
                             f"(default {defaults.compute_memory_bytes // mib} MiB)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections (HTTP and WebSocket); one more is answered 503 with Retry-After and "
                             f"closed (default {defaults.max_connections})")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                        help="seconds a connection has to send a whole request header, from when it opens or from "
                             f"its previous reply, before it is closed (default {defaults.header_timeout:g})")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                        help=f"seconds a forward's or backward's body may take to arrive (default {defaults.body_timeout:g})")
    parser.add_argument("--idle-connection-timeout", type=float, default=defaults.idle_connection_timeout,
                        help="seconds a session or push WebSocket that holds no session (no running push) may stay "
                             "silent, and a reply may wait for a peer that does not read, before the connection is "
                             f"closed (default {defaults.idle_connection_timeout:g})")
    parser.add_argument("--max-sessions-per-connection", type=int, default=defaults.max_sessions_per_connection,
                        help=f"open sessions of one WebSocket (default {defaults.max_sessions_per_connection})")
    parser.add_argument("--max-sessions-per-address", type=int, default=defaults.max_sessions_per_address,
                        help="open sessions of one client address over all its connections "
                             f"(default {defaults.max_sessions_per_address})")
    parser.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests,
                        help="forward/backward requests in flight (being read, queued or running) "
                             f"(default {defaults.max_queued_requests})")
    parser.add_argument("--max-queued-bytes", type=int, default=defaults.max_queued_bytes,
                        help="bytes of the forward/backward requests in flight, as their Content-Length declares "
                             f"(default {defaults.max_queued_bytes // mib} MiB)")
    parser.add_argument("--push-timeout", type=float, default=defaults.push_timeout,
                        help="seconds to connect to the next server and hand it a step; past it the push counts as "
                             f"failed and the client sends the step on itself (default {defaults.push_timeout:g})")


def run_serve(args: argparse.Namespace) -> int:
    import torch

    from llmswarm_core.source import resolve
    from llmswarm_node.server import BlockServer, ServerOptions, serve
    from llmswarm_node.span import SpanRunner
    from llmswarm_node.span_loader import load_adapter, load_span, release_freed_memory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The main thread loads the span, measures it and runs lone decode steps inline (the event loop);
    # bulk passes run on the compute thread with their own OpenMP team. Keeping the main thread at the
    # decode size leaves no second, idle team behind (measured: a 128-token prefill pass through 10
    # blocks took 73 ms with one, 62 ms without).
    bulk_threads = args.threads or torch.get_num_threads()
    decode_threads = args.decode_threads or bulk_threads
    torch.set_num_threads(decode_threads)
    if args.relay and not args.swarm:
        print("error: --relay serves through a route map's relay: give the route map with --join URL", file=sys.stderr)
        return 2
    source = resolve(args.model, progress=not args.quiet)
    start, end = args.blocks
    if end > source.num_blocks:
        print(f"error: span {start}:{end} is outside the model's {source.num_blocks} blocks", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_span(source, start, end, dtype=getattr(torch, args.dtype), progress=not args.quiet,
                       quantization=args.quantization, device=device)
    for adapter in args.adapters:
        name, _, path = adapter.partition("=")
        load_adapter(loaded, name, path)
    span = SpanRunner(loaded)
    limits = ServerLimits(
        max_sessions=args.max_sessions,
        max_length=args.max_length,
        max_batch=args.max_batch,
        max_tokens_per_request=args.max_tokens_per_request,
        max_message_bytes=args.max_message_bytes,
        kv_cache_bytes=args.kv_cache_bytes,
        session_idle_timeout=args.session_idle_timeout,
        compute_memory_bytes=args.compute_memory_bytes,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        idle_connection_timeout=args.idle_connection_timeout,
        max_sessions_per_connection=args.max_sessions_per_connection,
        max_sessions_per_address=args.max_sessions_per_address,
        max_queued_requests=args.max_queued_requests,
        max_queued_bytes=args.max_queued_bytes,
        push_timeout=args.push_timeout,
    )
    options = ServerOptions(
        model_name=args.served_model_name or source.name, host=args.host, port=args.port, public_url=args.public_url,
        swarm=args.swarm.rstrip("/") if args.swarm else None, server_id=args.server_id,
        identity_file=identity_file(args), limits=limits,
        batching=BatchOptions(
            max_batch_rows=args.max_batch_rows, max_batch_tokens=args.max_batch_tokens,
            batch_wait=args.batch_wait_ms / 1000, prefill_chunk=args.prefill_chunk,
            threads=bulk_threads, decode_threads=decode_threads,
        ),
        token=token_from_env(args.token), authority_key=authority_from_env(args.authority_key),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        drain_timeout=args.drain_timeout, push=args.push, relay=args.relay,
        lora=LoraLimits(max_rank=args.max_lora_rank, max_request_bytes=args.max_lora_bytes,
                        session_bytes=args.lora_session_bytes, published_bytes=args.published_adapter_bytes),
    )
    server = BlockServer(span, options)
    throughput = span.measure_throughput()
    release_freed_memory()  # the warm-up passes' temporaries (nf4 on a CPU: ~50 MiB of dequantized weights)
    server.set_throughput(throughput)
    logging.getLogger("llmswarm.node").info("span [%d, %d): %.1f tokens/s", start, end, throughput)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)  # drain: leave the route map, let open sessions finish
        await serve(server, args.host, args.port, stop)

    try:
        asyncio.run(main())
    except (asyncio.CancelledError, KeyboardInterrupt):
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmswarm serve", description=__doc__)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
