"""``rankwise fed``: federated LoRA on Flower (simulate on one machine, or deploy across many).

Flower is an extra (``pip install 'rankwise[fed]'``); without it these verbs say so in one line
and every other verb works as before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

from rankwise.atomic import atomic_file
from rankwise.commands.options import add_options, parse_options
from rankwise.errors import RankwiseError
from rankwise.fed.config import FedConfig
from rankwise.fed.flower import need_flower
from rankwise.fed.registry import METHODS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fed", help="federated LoRA on Flower: simulate, deploy")
    verbs = parser.add_subparsers(dest="fed_command", required=True, metavar="VERB")
    simulate = verbs.add_parser(
        "simulate",
        help=f"simulate clients on this machine (method: {', '.join(METHODS)})",
        description="A federated run in a private Flower simulation. Every YAML key is also a "
        "flag, every `rankwise train` key included (max_steps: local steps per round).",
    )
    simulate.add_argument("--resume", action="store_true", help="continue after the last round")
    add_options(simulate, FedConfig, positional_config=True)
    simulate.set_defaults(func=run_simulate)
    run = verbs.add_parser("run", help="submit the run to a running SuperLink (`flwr run`)")
    run.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    run.add_argument("--insecure", action="store_true", help="no TLS (loopback trials only)")
    run.add_argument("--root-certificates", default=None, help="CA certificate of the SuperLink")
    run.add_argument("--resume", action="store_true", help="continue after the last round")
    add_options(run, FedConfig, positional_config=True)
    run.set_defaults(func=run_deployed)
    server = verbs.add_parser("server", help="start a SuperLink (`flower-superlink`)")
    server.add_argument("--port", type=int, default=9091, help="its HTTP port (all APIs)")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--insecure", action="store_true", help="no TLS (loopback trials only)")
    server.add_argument("--ssl-certfile", default=None, help="TLS certificate")
    server.add_argument("--ssl-keyfile", default=None, help="TLS private key")
    server.add_argument("--ssl-ca-certfile", default=None, help="TLS CA certificate")
    server.add_argument(
        "--enable-supernode-auth", action="store_true", help="only registered SuperNodes join"
    )
    server.set_defaults(func=run_server)
    client = verbs.add_parser("client", help="start a SuperNode (`flower-supernode`)")
    client.add_argument("--server", required=True, help="the SuperLink's HOST:PORT")
    client.add_argument("--partition-id", type=int, required=True, help="this client's index")
    client.add_argument("--data", required=True, help="this client's training data (local path)")
    client.add_argument(
        "--port",
        type=int,
        default=9094,
        help="the node's local runtime port (one per client on the same machine)",
    )
    client.add_argument("--insecure", action="store_true", help="no TLS (loopback trials only)")
    client.add_argument("--root-certificates", default=None, help="CA certificate of the SuperLink")
    client.add_argument("--auth-supernode-private-key", default=None, help="node auth key")
    client.set_defaults(func=run_client)


def prepared(args: argparse.Namespace) -> tuple[FedConfig, Path]:
    """The run's settings with absolute paths, written where the ServerApp reads them."""
    config = parse_options(args)
    absolute = {"output_dir": str(Path(config.output_dir).resolve())}
    for key in ("model", "data", "eval_data", "calib"):
        value = getattr(config, key)
        if value and Path(value).exists():
            absolute[key] = str(Path(value).resolve())
    config = dataclasses.replace(config, **absolute)
    config.output.mkdir(parents=True, exist_ok=True)
    path = config.output / "fed_config.json"
    text = json.dumps({"config": config.as_dict(), "resume": bool(args.resume)}, indent=2)
    atomic_file(path, lambda tmp: tmp.write_text(text))
    return config, path


def run_simulate(args: argparse.Namespace) -> None:
    need_flower("flower")
    from rankwise.fed.partition import write_partitions
    from rankwise.fed.simulation import simulate

    config, path = prepared(args)
    if not args.resume:
        write_partitions(
            config.data,
            config.partition,
            config.clients,
            config.output / "partitions",
            config.train_examples,
            config.seed,
        )
    simulate(path, config.clients, config.output)
    report(config)


def report(config: FedConfig) -> None:
    lines = (config.output / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {"round": 0}
    if last["round"] < config.rounds:
        raise RankwiseError(
            f"the run stopped after round {last['round']} of {config.rounds}: "
            f"see {config.output / 'superlink.log'}; --resume continues"
        )
    print(
        f"{config.rounds} rounds of {config.method}; global adapter in {config.output / 'adapter'}"
    )


def flwr_tool(name: str) -> str:
    need_flower("flower")
    found = shutil.which(name)
    if found is None:
        raise RankwiseError(f"'{name}' is not on PATH: pip install 'rankwise[fed]'")
    return found


def run_server(args: argparse.Namespace) -> None:
    command = [flwr_tool("flower-superlink"), "--host", args.host, "--port", str(args.port)]
    command += ["--disable-runtime-dependency-installation"]
    command += ["--insecure"] if args.insecure else []
    for flag in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certfile"):
        if getattr(args, flag):
            command += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    command += ["--enable-supernode-auth"] if args.enable_supernode_auth else []
    subprocess.run(command, check=False)


def run_client(args: argparse.Namespace) -> None:
    data = str(Path(args.data).resolve())
    node = f'partition-id={args.partition_id} data="{data}"'
    command = [flwr_tool("flower-supernode"), "--superlink", args.server, "--node-config", node]
    command += ["--port", str(args.port)]
    command += ["--insecure"] if args.insecure else []
    if args.root_certificates:
        command += ["--root-certificates", args.root_certificates]
    if args.auth_supernode_private_key:
        command += ["--auth-supernode-private-key", args.auth_supernode_private_key]
    subprocess.run(command, check=False)


def run_deployed(args: argparse.Namespace) -> None:
    from rankwise.fed.simulation import flower_env, write_app

    config, path = prepared(args)
    home = config.output / "flwr-home"
    home.mkdir(exist_ok=True)
    security = (
        "insecure = true" if args.insecure else f'root-certificates = "{args.root_certificates}"'
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "rankwise"\n\n[superlink.rankwise]\n'
        f'address = "{args.superlink}"\n{security}\n'
    )
    app = write_app(home / "app")
    command = [flwr_tool("flwr"), "run", str(app), "rankwise", "--stream"]
    command += ["--run-config", f"rankwise-config={json.dumps(str(path))}"]
    subprocess.run(command, env=flower_env(home), check=False)
    report(config)
