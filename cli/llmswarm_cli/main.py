"""The ``llmswarm`` command: up, serve, generate, chat, routes."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from llmswarm_core.defaults import DEFAULT_MODEL, DEFAULT_SWARM, FLOAT_DTYPES, ROUTE_MAP_PORT
from llmswarm_core.threads import shared_cores_env


def _load_model(args: argparse.Namespace) -> Any:
    from llmswarm.config import ClientConfig
    from llmswarm.model import DistributedModelForCausalLM

    return DistributedModelForCausalLM.from_pretrained(args.model, swarm=args.swarm, wire_dtype=args.wire_dtype,
                                                       token=args.token, tls_ca=args.tls_ca,
                                                       client_config=ClientConfig(relay=args.relay))


def _answer(model: Any, messages: list[dict[str, str]], args: argparse.Namespace) -> str:
    """Stream one assistant answer to stdout and return it."""
    import torch
    from transformers import TextStreamer

    tokenizer = model.tokenizer
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling: dict[str, Any] = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling,
    )
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load_model(args)
    _answer(model, [{"role": "user", "content": args.prompt}], args)
    return 0


def _chat_loop(model: Any, args: argparse.Namespace) -> None:
    print("chat with the swarm; an empty line or Ctrl-D ends it", flush=True)
    messages: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return
        if not text or text in ("/exit", "/quit"):
            return
        messages.append({"role": "user", "content": text})
        print("swarm> ", end="", flush=True)
        messages.append({"role": "assistant", "content": _answer(model, messages, args)})


def cmd_chat(args: argparse.Namespace) -> int:
    _chat_loop(_load_model(args), args)
    return 0


def cmd_gateway_keys(args: argparse.Namespace) -> int:
    from llmswarm.gateway.keys import KeyFileError, create_key, revoke_key

    try:
        if args.action == "create":
            print(create_key(Path(args.file), args.name, args.requests_per_minute))
            print(f"key {args.name!r} added to {args.file}; it is shown only this once", file=sys.stderr)
        else:
            revoke_key(Path(args.file), args.name)
            print(f"key {args.name!r} revoked; running gateways refuse it within a second", file=sys.stderr)
    except KeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_credentials(args: argparse.Namespace) -> int:
    """The swarm's authority key (made on first use, kept with mode 0600) and the credentials it signs."""
    from llmswarm_core.credentials import Authority, CredentialError
    from llmswarm_core.identity import IdentityError, ServerIdentity
    from llmswarm_core.source import cache_root

    path = Path(args.authority_file) if args.authority_file else cache_root() / "authority.pem"
    try:
        authority = Authority(ServerIdentity.load_or_create(path))
        if args.action == "public-key":
            print(authority.public_key)
            print(f"the authority key is kept in {path}; give this public key to the route map and the servers "
                  "(--authority-key or $LLMSWARM_AUTHORITY_KEY)", file=sys.stderr)
        else:
            ttl = args.ttl_hours * 3600 if args.ttl_hours else None
            print(authority.issue(args.name, args.roles.split(","), ttl))
            print(f"credential {args.name!r} with roles {args.roles}; it is shown only this once", file=sys.stderr)
    except (CredentialError, IdentityError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    routes = _swarm_client(args).routes()
    model = routes.model
    print(f"model: {model.name if model else '-'}  blocks: {model.num_blocks if model else '-'}  "
          f"version: {routes.version}")
    rows = [("ID", "URL", "SPAN", "STATE", "TOKENS/S")]
    rows += [(s.id, s.url, f"{s.start}:{s.end}", s.state, f"{s.throughput:.1f}") for s in routes.servers]
    _print_table(rows)
    coverage = routes.coverage()
    if coverage:
        uncovered = [b for b, c in enumerate(coverage) if c == 0]
        print(f"min servers per block: {min(coverage)}" + (f"; uncovered blocks: {uncovered}" if uncovered else ""))
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _swarm_client(args: argparse.Namespace) -> Any:
    from llmswarm.config import ClientConfig
    from llmswarm.sequence_manager import SwarmClient
    from llmswarm_core.security import token_from_env

    return SwarmClient(args.swarm, ClientConfig(token=token_from_env(args.token), tls_ca=args.tls_ca))


def cmd_adapters(args: argparse.Namespace) -> int:
    from llmswarm.errors import SwarmError
    from llmswarm.lora import LoraConfigError
    from llmswarm.publish import adapter_dir_body, publish, published

    client = _swarm_client(args)
    try:
        if args.action == "push":
            entry = publish(client, args.name, adapter_dir_body(args.dir, args.base_model), args.replace, args.publisher)
            print(f"published {entry['name']}: {entry['size']} bytes, r={entry['r']}, targets "
                  f"{','.join(entry['target_modules'])}, base model {entry['base_model']}")
            return 0
        rows = [("NAME", "PUBLISHER", "SIZE", "BASE MODEL", "R", "TARGETS")]
        rows += [(a["name"], a["publisher"], str(a["size"]), a["base_model"], str(a["r"]), ",".join(a["target_modules"]))
                 for a in published(client)]
        _print_table(rows)
        return 0
    except (SwarmError, LoraConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def cmd_up(args: argparse.Namespace) -> int:
    from llmswarm_control.placement import PlacementError
    from llmswarm_core.security import authority_from_env, token_from_env
    from llmswarm_local.swarm import LocalSwarm, LocalSwarmError, LocalSwarmOptions

    options = LocalSwarmOptions(
        model=args.model, servers=args.servers, redundancy=args.redundancy,
        blocks_per_server=args.blocks_per_server, host=args.host, port=args.port, dtype=args.dtype,
        threads=args.threads, token=token_from_env(args.token),
        authority_key=authority_from_env(args.authority_key), tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_ca=args.tls_ca, server_args=["--quantization", args.quantization], relay=args.relay,
        server_host=args.server_host,
    )
    if args.blocks_per_server is not None and args.servers_given is False:
        options.servers = None
    rebalance_options = None
    if args.rebalance:
        from llmswarm_local.rebalancer import RebalanceOptions

        try:
            rebalance_options = RebalanceOptions(interval=args.rebalance_interval, min_gain=args.min_gain,
                                                 max_moves=args.max_moves, prometheus_url=args.prometheus_url)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        swarm = LocalSwarm(options).start()
    except (LocalSwarmError, PlacementError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    rebalancer = None
    try:
        print(f"route map: {swarm.url}", flush=True)
        for span, log in zip(swarm.spans, swarm.log_files, strict=True):
            print(f"  server blocks {span}  log {log}", flush=True)
        if rebalance_options is not None:
            from llmswarm_local.rebalancer import LocalRebalancer

            rebalancer = LocalRebalancer(swarm, rebalance_options, report=lambda text: print(text, flush=True)).start()
            where = rebalance_options.prometheus_url or "the servers' /metrics"
            print(f"rebalancing every {rebalance_options.interval:g} s from {where} (minimum gain "
                  f"{rebalance_options.min_gain:.0%}, at most {rebalance_options.max_moves} move(s) per round)", flush=True)
        args.swarm = swarm.url
        if args.prompt:
            model = _load_model(args)
            _answer(model, [{"role": "user", "content": args.prompt}], args)
        elif args.chat:
            _chat_loop(_load_model(args), args)
        else:
            print("swarm is up; Ctrl-C stops it", flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    finally:
        print("stopping the swarm", file=sys.stderr, flush=True)
        if rebalancer is not None:
            rebalancer.stop()
        swarm.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from llmswarm_node.main import run_serve

    return run_serve(args)


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--wire-dtype", choices=FLOAT_DTYPES, default="float32",
                        help="dtype of hidden states on the wire")


def build_parser() -> argparse.ArgumentParser:
    from llmswarm_node.main import add_security_arguments, add_serve_arguments

    parser = argparse.ArgumentParser(prog="llmswarm", description="Run a language model split across block servers.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local swarm (route map + block servers) in the foreground")
    up.add_argument("--model", default=DEFAULT_MODEL, help="model SPEC (directory, .gguf, org/name or smollm2)")
    up.add_argument("--servers", type=int, default=None, help="number of block servers (default 3)")
    up.add_argument("--redundancy", type=int, default=1, help="servers per block")
    up.add_argument("--blocks-per-server", type=int, default=None, help="fix the span size")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=ROUTE_MAP_PORT, help="route-map port")
    up.add_argument("--server-host", help="the block servers' listening address (default: --host); 127.0.0.1 keeps "
                                          "them private to this machine, reached from outside through --relay")
    up.add_argument("--relay", action="store_true",
                    help="the route map relays: servers behind NAT attach (serve --join URL --relay) and clients "
                         "outside (ClientConfig(relay=True)) reach every server through its one address")
    up.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32")
    up.add_argument("--quantization", choices=("none", "int8", "nf4"), default="none",
                    help="quantize the servers' blocks with bitsandbytes")
    up.add_argument("--threads", type=int, default=0, help="torch threads per server")
    up.add_argument("--chat", action="store_true", help="open an interactive chat, stop the swarm after it")
    up.add_argument("--prompt", help="answer one prompt, then stop the swarm")
    up.add_argument("--rebalance", action="store_true", help="move spans of servers to where the load is")
    up.add_argument("--rebalance-interval", type=float, default=30.0, help="seconds between rebalance rounds")
    up.add_argument("--min-gain", type=float, default=0.25,
                    help="smallest relative gain of the bottleneck throughput worth moving a server")
    up.add_argument("--max-moves", type=int, default=1, help="servers moved per rebalance round, at most")
    up.add_argument("--prometheus-url", help="read load from this Prometheus (default: scrape the servers' /metrics)")
    add_security_arguments(up)
    _add_generation_arguments(up)
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="serve one span of blocks (what the node image runs)")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    for name, func, text in (("generate", cmd_generate, "answer one prompt"), ("chat", cmd_chat, "interactive chat")):
        command = sub.add_parser(name, help=f"{text} through a swarm (chat template applied, streamed)")
        command.add_argument("--swarm", default=DEFAULT_SWARM, help="route-map URL")
        command.add_argument("--model", default=DEFAULT_MODEL, help="model SPEC for the client's local part")
        _add_generation_arguments(command)
        command.add_argument("--token", help="swarm token (default: $LLMSWARM_TOKEN)")
        command.add_argument("--tls-ca", help="CA bundle (PEM) to verify https servers")
        command.add_argument("--relay", action="store_true", help="reach every server through the route map's "
                                                                  "relay (from outside the swarm's cluster)")
        if name == "generate":
            command.add_argument("prompt")
        command.set_defaults(func=func)

    from llmswarm.gateway.cli import add_gateway_command

    add_gateway_command(sub)

    keys = sub.add_parser("gateway-keys", help="create or revoke the gateway's API keys (a file of hashed keys)")
    keys.add_argument("action", choices=("create", "revoke"))
    keys.add_argument("--file", required=True, help="the API keys file (`llmswarm gateway --api-keys FILE`)")
    keys.add_argument("--name", required=True, help="the key's name (in the usage metrics)")
    keys.add_argument("--requests-per-minute", type=int, help="rate limit of the key (create)")
    keys.set_defaults(func=cmd_gateway_keys)

    credentials = sub.add_parser("credentials", help="the swarm's authority key and credentials with roles "
                                                     "(use, join, admin)")
    credentials.add_argument("action", choices=("public-key", "issue"),
                             help="public-key: print the authority's public key (made on first use); "
                                  "issue: print a new credential signed by it")
    credentials.add_argument("--authority-file", help="the authority's private key (default: "
                                                      "$LLMSWARM_CACHE/authority.pem, made on first use)")
    credentials.add_argument("--name", default="client", help="who holds the credential (issue)")
    credentials.add_argument("--roles", default="use", help="comma-separated roles of use, join, admin (issue)")
    credentials.add_argument("--ttl-hours", type=float, help="the credential expires after this long (issue)")
    credentials.set_defaults(func=cmd_credentials)

    routes = sub.add_parser("routes", help="print the route map as a table")
    routes.add_argument("--swarm", default=DEFAULT_SWARM, help="route-map URL")
    routes.add_argument("--token", help="swarm token (default: $LLMSWARM_TOKEN)")
    routes.add_argument("--tls-ca", help="CA bundle (PEM) to verify https servers")
    routes.set_defaults(func=cmd_routes)

    adapters = sub.add_parser("adapters", help="publish a LoRA adapter to the swarm, or list the published ones")
    actions = adapters.add_subparsers(dest="action", required=True)
    push = actions.add_parser("push", help="publish a PEFT adapter directory under a name")
    push.add_argument("dir", help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    push.add_argument("--name", required=True, help="the name clients select it by (active_adapter=NAME)")
    push.add_argument("--replace", action="store_true", help="replace an adapter of that name you published before")
    push.add_argument("--publisher", help="who publishes it, as the list shows (default: your user name)")
    push.add_argument("--base-model", help="the swarm's model name, where the adapter's config names another")
    listing = actions.add_parser("list", help="the published adapters as a table")
    for command in (push, listing):
        command.add_argument("--swarm", default=DEFAULT_SWARM, help="route-map URL")
        command.add_argument("--token", help="swarm token (default: $LLMSWARM_TOKEN)")
        command.add_argument("--tls-ca", help="CA bundle (PEM) to verify https servers")
        command.set_defaults(func=cmd_adapters)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["up"]:
        # The client shares the cores with the local servers (see threads.py). Set before torch
        # (and its OpenMP runtime) is loaded.
        os.environ.update(shared_cores_env(os.environ))
    args = build_parser().parse_args(argv)
    if args.command == "up":
        args.servers_given = args.servers is not None
        if args.servers is None and args.blocks_per_server is None:
            args.servers = 3
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
