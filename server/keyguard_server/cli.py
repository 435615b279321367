"""``keyguard-server``: run the server, and make caller tokens for its config.

The admin command line for keys, whitelists and accounts is the client's ``keyguard``; this is
what only a host running the server needs. ``keyguard serve`` / ``keyguard new-token`` run this
command, so both spellings work wherever the server is installed.

Exit status: 0 success, 1 error (a config or startup error is printed, without a traceback),
2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keyguard_server._callers import new_token, token_sha256
from keyguard_server._config import Config
from keyguard_server._server import run

EXIT_ERROR = 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "new-token":
        return _new_token()
    return _serve(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyguard-server", description=__doc__.split("\n\n")[0].strip("`"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the keyguard server")
    serve.add_argument("--config", help="TOML config file (env KEYGUARD_CONFIG)")
    serve.add_argument("--listen", help="host:port to listen on (default 127.0.0.1:50051)")
    serve.add_argument("--data-dir", help="directory for local state (default ./data)")
    serve.add_argument("--database", help="database URL (default sqlite:///<data-dir>/keyguard.db)")
    serve.add_argument("--workers", type=int, help="processes serving the same port (default 1)")
    commands.add_parser("new-token", help="generate a caller token and the token_sha256 line for the config")
    return parser


def _new_token() -> int:
    token = new_token()
    print(f"token:        {token}")
    print(f'token_sha256 = "{token_sha256(token)}"')
    print("Give the token to the caller (its KEYGUARD_TOKEN); put only token_sha256 in the server config.")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        config = Config.load(
            args.config, listen=args.listen, data_dir=args.data_dir, database=args.database, workers=args.workers
        )
        run(config)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0
