"""``keyguard``: the admin command line, mirroring an exchange's API-management page.

Exit status: 0 success (or an allowed authorize), 1 error, 2 usage error,
3 authorize refused.

``keyguard serve`` and ``keyguard new-token`` belong to the server: they run the
``keyguard-server`` command of the separate ``keyguard-server`` distribution (the
client never imports the server), and say what to install when it is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from keyguard._client import DEFAULT_TARGET, Client
from keyguard._errors import InvalidArgument, KeyguardError, Unavailable
from keyguard._models import ApiKey, AuditEvent, KeyType, WithdrawalAddress, WithdrawalDestination

DEFAULT_TOKEN_FILE = os.path.join(os.environ.get("KEYGUARD_DATA_DIR", "data"), "admin.token")
EXIT_ERROR = 1
EXIT_DENIED = 3

PRIVATE_KEY_WARNING = (
    "Save the private key now: it is shown only this once and cannot be recovered.\n"
    "Never give it to anyone. Whoever holds it can use your account through the API."
)


# The client's commands that are the server's: `keyguard-server serve ...` is `keyguard-server serve ...`.
SERVER_COMMANDS = ("serve", "new-token")
SERVER_PROGRAM = "keyguard-server"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SERVER_COMMANDS:
        return _run_server(argv)
    args = _parser().parse_args(argv)
    if args.command in SERVER_COMMANDS:  # after global flags, which the server has no use for
        return _run_server(argv[argv.index(args.command) :])
    try:
        with _connect(args) as client:
            result: int = args.run(client, args)
            return result
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except Unavailable as exc:
        print(f"error: cannot reach keyguard at {args.target} ({exc.message}); is it running?", file=sys.stderr)
    except InvalidArgument as exc:
        print("error: invalid request", file=sys.stderr)
        for violation in exc.violations or [exc.message]:
            print(f"  {violation}", file=sys.stderr)
    except KeyguardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
    return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyguard", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument(
        "--target",
        default=os.environ.get("KEYGUARD_TARGET", DEFAULT_TARGET),
        help="server address (env KEYGUARD_TARGET, default %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default %(default)s)")
    auth = parser.add_argument_group("caller credentials")
    auth.add_argument(
        "--token-file",
        default=os.environ.get("KEYGUARD_TOKEN_FILE", DEFAULT_TOKEN_FILE),
        help="file holding the caller token (env KEYGUARD_TOKEN_FILE, default %(default)s: "
        "the admin token `keyguard-server serve` generates with no callers configured)",
    )
    auth.add_argument("--tls-ca", default=os.environ.get("KEYGUARD_TLS_CA"), help="CA certificate (PEM) for TLS")
    auth.add_argument("--tls-cert", default=os.environ.get("KEYGUARD_TLS_CERT"), help="client certificate for mTLS")
    auth.add_argument("--tls-key", default=os.environ.get("KEYGUARD_TLS_KEY"), help="client key for mTLS")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON instead of text")

    # Listed for --help; main() hands them to keyguard-server before parsing (see _run_server).
    commands.add_parser("serve", help=f"run the keyguard server ({SERVER_PROGRAM} serve)", add_help=False)

    keys = commands.add_parser("keys", help="create, list and delete API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", parents=[out], help="create a key; shows its private key once")
    create.add_argument("account_id")
    create.add_argument("--name", required=True)
    create.add_argument("--permission", required=True, choices=["read", "trade", "withdraw"])
    create.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="IP[,IP...]",
        help="allowed IP address or CIDR network; repeat or separate with commas (none = any IP)",
    )
    create.add_argument("--expires-in", type=_duration, metavar="DURATION", help="e.g. 90d, 12h, 30m")
    create.add_argument(
        "--type", choices=["secret", "ed25519"], default="secret", help="ed25519: the bot signs requests"
    )
    create.add_argument("--public-key", metavar="PEM_FILE", help="ed25519: your own public key (else one is generated)")
    create.add_argument(
        "--symbols",
        action="append",
        default=[],
        metavar="SYMBOL[,SYMBOL...]",
        help="the only trading symbols TRADE requests may name, e.g. BTCUSDT; repeat or separate with commas "
        "(none = any symbol)",
    )
    create.set_defaults(run=_keys_create)
    listing = keys.add_parser("list", parents=[out], help="list an account's keys")
    listing.add_argument("account_id")
    listing.set_defaults(run=_keys_list)
    get = keys.add_parser("get", parents=[out], help="show one key")
    get.add_argument("account_id")
    get.add_argument("access_key")
    get.set_defaults(run=_keys_get)
    delete = keys.add_parser("delete", help="delete one key")
    delete.add_argument("account_id")
    delete.add_argument("access_key")
    delete.set_defaults(run=_keys_delete)
    update = keys.add_parser("update", parents=[out], help="change a key's name, permission, IPs or expiry")
    update.add_argument("account_id")
    update.add_argument("access_key")
    update.add_argument("--name")
    update.add_argument("--permission", choices=["read", "trade", "withdraw"])
    ips = update.add_mutually_exclusive_group()
    ips.add_argument("--ip", action="append", metavar="IP[,IP...]", help="replace the allowlist")
    ips.add_argument("--any-ip", action="store_true", help="clear the allowlist (not for WITHDRAW keys)")
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=_duration, metavar="DURATION", help="e.g. 90d, 12h, 30m")
    expiry.add_argument("--no-expiry", action="store_true", help="never expire")
    symbols = update.add_mutually_exclusive_group()
    symbols.add_argument("--symbols", action="append", metavar="SYMBOL[,SYMBOL...]", help="replace the symbol list")
    symbols.add_argument("--any-symbol", action="store_true", help="clear the symbol list (any symbol)")
    update.set_defaults(run=_keys_update)
    for action, enabled in (("enable", True), ("disable", False)):
        toggle = keys.add_parser(
            action, parents=[out], help=f"{action} a key (kept, {'accepted' if enabled else 'refused'})"
        )
        toggle.add_argument("account_id")
        toggle.add_argument("access_key")
        toggle.set_defaults(run=_keys_update, enabled=enabled)
    rotate = keys.add_parser("rotate", parents=[out], help="a new private key for the same access key")
    rotate.add_argument("account_id")
    rotate.add_argument("access_key")
    rotate.add_argument(
        "--grace",
        type=_duration,
        metavar="DURATION",
        help="how long the old private key keeps working (default 24h; 0 = no)",
    )
    rotate.add_argument(
        "--public-key", metavar="PEM_FILE", help="ed25519: your new public key (else a pair is generated)"
    )
    rotate.set_defaults(run=_keys_rotate)
    delete_all = keys.add_parser("delete-all", help="delete every key of an account")
    delete_all.add_argument("account_id")
    delete_all.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete_all.set_defaults(run=_keys_delete_all)

    addresses = commands.add_parser("addresses", help="the withdrawal-address whitelist").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add = addresses.add_parser("add", parents=[out], help="whitelist a withdrawal address")
    add.add_argument("account_id")
    add.add_argument("--asset", required=True, help="e.g. BTC, USDT-TRC20")
    add.add_argument("--address", required=True)
    add.add_argument("--memo", default="", help="memo / tag, for chains that need one")
    add.add_argument("--label", default="")
    add.set_defaults(run=_addresses_add)
    addr_list = addresses.add_parser("list", parents=[out], help="list whitelisted addresses")
    addr_list.add_argument("account_id")
    addr_list.set_defaults(run=_addresses_list)
    remove = addresses.add_parser("remove", help="remove a whitelisted address by id")
    remove.add_argument("account_id")
    remove.add_argument("address_id", type=int)
    remove.set_defaults(run=_addresses_remove)

    audit = commands.add_parser(
        "audit",
        parents=[out],
        help="the audit log, newest first",
        description="The audit log, newest first. In text output, DETAILS are KEY=VALUE pairs separated by "
        "spaces; a value (or any other column's text) that is empty or has anything but ASCII letters, digits "
        f'and {_PLAIN_PUNCTUATION} is a JSON string: in double quotes, with \\, " and every control or '
        "non-ASCII character escaped. So no value can pass for another pair or another line.",
    )
    audit.add_argument("account_id", nargs="?", default="", help="only this account (default: all)")
    audit.add_argument("--limit", type=int, default=20, help="how many events (default %(default)s)")
    audit.set_defaults(run=_audit)

    commands.add_parser(
        "new-token", help=f"a caller token and its config line ({SERVER_PROGRAM} new-token)", add_help=False
    )

    management = commands.add_parser(
        "address-management", parents=[out], help="withdrawals only to whitelisted addresses: on, off or status"
    )
    management.add_argument("state", choices=["on", "off", "status"])
    management.add_argument("account_id")
    management.set_defaults(run=_address_management)

    accounts = commands.add_parser(
        "accounts", help="an account's settings; freeze or unfreeze its API access"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    show = accounts.add_parser("show", parents=[out], help="frozen, address management, keys")
    show.add_argument("account_id")
    show.set_defaults(run=_accounts_show)
    for action, frozen in (("freeze", True), ("unfreeze", False)):
        toggle = accounts.add_parser(
            action,
            parents=[out],
            help="refuse every key of the account (ACCOUNT_FROZEN), keeping them; admin callers only"
            if frozen
            else "accept the account's keys again; admin callers only",
        )
        toggle.add_argument("account_id")
        toggle.add_argument("--reason", default="", help="for the audit log, e.g. a ticket id")
        toggle.set_defaults(run=_accounts_freeze, frozen=frozen)

    authorize = commands.add_parser(
        "authorize", parents=[out], help="ask keyguard whether a bot request would be allowed"
    )
    authorize.add_argument("--access-key", required=True)
    authorize.add_argument(
        "--private-key",
        default=os.environ.get("KEYGUARD_PRIVATE_KEY", ""),
        help="the key's secret (better: env KEYGUARD_PRIVATE_KEY, kept out of shell history)",
    )
    authorize.add_argument("--ip", required=True, help="the bot's IP address")
    authorize.add_argument("--permission", required=True, choices=["read", "trade", "withdraw"])
    authorize.add_argument("--asset", help="withdrawal destination asset (withdraw only)")
    authorize.add_argument("--address", help="withdrawal destination address (withdraw only)")
    authorize.add_argument("--memo", default="", help="withdrawal destination memo / tag")
    authorize.add_argument("--symbol", default="", help="the trading symbol of a trade request, e.g. BTCUSDT")
    authorize.set_defaults(run=_authorize)
    return parser


def _connect(args: argparse.Namespace) -> Client:
    """A client with the credentials the flags and environment name.

    Token: KEYGUARD_TOKEN, else the token file if it exists (so the zero-config
    admin token just works when run next to `keyguard-server serve`).
    """
    token = os.environ.get("KEYGUARD_TOKEN")
    if not token and os.path.exists(args.token_file):
        with open(args.token_file) as f:
            token = f.read().strip()

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return Client(
        args.target,
        token=token,
        root_certificates=read(args.tls_ca),
        certificate_chain=read(args.tls_cert),
        private_key=read(args.tls_key),
        timeout=args.timeout,
    )


def server_program() -> str | None:
    """The ``keyguard-server`` command: beside this Python first (the same virtualenv, even when
    it is not activated), else on PATH; None when the server is not installed."""
    here = os.path.dirname(sys.executable)
    return shutil.which(SERVER_PROGRAM, path=os.pathsep.join([here, os.environ.get("PATH", "")]))


def _run_server(argv: list[str]) -> int:
    """Replaces this process with ``keyguard-server ARGV`` (same pid, so signals and the exit
    status are the server's), or says how to get it."""
    program = server_program()
    if program is None:
        print(
            f"error: `keyguard {argv[0]}` needs the server, which is not installed here: "
            f"pip install keyguard-server (then `{SERVER_PROGRAM} {argv[0]}`)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(program, [program, *argv])  # noqa: S606  # our own command, found as above, no shell


def _keys_create(client: Client, args: argparse.Namespace) -> int:
    expires_at = datetime.now(UTC) + args.expires_in if args.expires_in else None
    public_key = ""
    if args.public_key:
        with open(args.public_key) as f:
            public_key = f.read()
    created = client.create_key(
        args.account_id,
        args.name,
        args.permission,
        _ips(args.ip),
        expires_at=expires_at,
        key_type=KeyType[args.type.upper()],
        public_key=public_key,
        symbols=_ips(args.symbols),
    )
    if args.json:
        _print_json({**_jsonable(created.key), "private_key": created.private_key})
        return 0
    key = created.key
    kind = " ED25519" if key.key_type is KeyType.ED25519 else ""
    print(f"Created {key.permission.name}{kind} key {key.name!r} for account {key.account_id}.")
    print(f"  Access key:  {key.access_key}")
    print(f"  Allowed IPs: {', '.join(key.allowed_ips) or 'any'}")
    if key.symbols:
        print(f"  Symbols:     {', '.join(key.symbols)}")
    if key.unrestricted_until:
        print(f"  Without an IP allowlist it may trade until {_time(key.unrestricted_until)}.")
    if key.key_type is KeyType.ED25519:
        print(f"  Public key:\n{key.public_key}")
        if not created.private_key:
            print("Sign requests with your own private key; keyguard never had it.")
            return 0
        print(f"  Private key (sign requests with it):\n{created.private_key}")
    else:
        print(f"  Private key: {created.private_key}")
    print()
    print(PRIVATE_KEY_WARNING)
    return 0


def _keys_list(client: Client, args: argparse.Namespace) -> int:
    keys = client.list_keys(args.account_id)
    if args.json:
        _print_json([_jsonable(k) for k in keys])
    elif not keys:
        print(f"Account {args.account_id} has no API keys.")
    else:
        _print_table(
            ["ACCESS KEY", "NAME", "PERMISSION", "STATUS", "ALLOWED IPS", "CREATED", "LAST USED"],
            [
                [
                    k.access_key,
                    k.name,
                    k.permission.name,
                    _status(k),
                    ",".join(k.allowed_ips) or "any",
                    _time(k.created_at),
                    _last_used(k),
                ]
                for k in keys
            ],
        )
    return 0


def _keys_get(client: Client, args: argparse.Namespace) -> int:
    key = client.get_key(args.account_id, args.access_key)
    if args.json:
        _print_json(_jsonable(key))
    else:
        _print_key(key)
    return 0


def _keys_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_key(args.account_id, args.access_key)
    print(f"Deleted key {args.access_key}.")
    return 0


def _keys_update(client: Client, args: argparse.Namespace) -> int:
    ip_args = getattr(args, "ip", None)
    ips = [] if getattr(args, "any_ip", False) else _ips(ip_args) if ip_args else None
    expires_in = getattr(args, "expires_in", None)
    symbol_args = getattr(args, "symbols", None)
    symbols = [] if getattr(args, "any_symbol", False) else _ips(symbol_args) if symbol_args else None
    key = client.update_key(
        args.account_id,
        args.access_key,
        name=getattr(args, "name", None),
        permission=getattr(args, "permission", None),
        allowed_ips=ips,
        expires_at=datetime.now(UTC) + expires_in if expires_in else None,
        clear_expires_at=getattr(args, "no_expiry", False),
        enabled=getattr(args, "enabled", None),
        symbols=symbols,
    )
    if args.json:
        _print_json(_jsonable(key))
    else:
        _print_key(key)
    return 0


def _keys_rotate(client: Client, args: argparse.Namespace) -> int:
    grace = None if args.grace is None else int(args.grace.total_seconds())
    public_key = ""
    if args.public_key:
        with open(args.public_key) as f:
            public_key = f.read()
    rotated = client.rotate_key(args.account_id, args.access_key, grace_seconds=grace, public_key=public_key)
    if args.json:
        _print_json({**_jsonable(rotated.key), "private_key": rotated.private_key})
        return 0
    if rotated.key.key_type is KeyType.ED25519:
        print(f"New public key for {rotated.key.access_key}:\n{rotated.key.public_key}")
        if rotated.private_key:
            print(f"New private key (sign requests with it):\n{rotated.private_key}")
    else:
        print(f"New private key for {rotated.key.access_key}: {rotated.private_key}")
    until = rotated.key.previous_key_valid_until
    print(
        f"The previous private key works until {_time(until)}."
        if until
        else "The previous private key no longer works."
    )
    print()
    print(PRIVATE_KEY_WARNING)
    return 0


def _duration(text: str) -> timedelta:
    """90d, 12h, 30m, 45s or plain seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        if text[-1:] in units:
            return timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return timedelta(seconds=float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90d, 12h, 30m)") from None


def _ips(args: list[str]) -> list[str]:
    """Comma-separated values of a repeated flag (IPs, symbols), as one list."""
    return [ip.strip() for arg in args for ip in arg.split(",") if ip.strip()]


def _keys_delete_all(client: Client, args: argparse.Namespace) -> int:
    if not args.yes:
        count = len(client.list_keys(args.account_id))
        if not sys.stdin.isatty():
            print("error: delete-all needs --yes when there is no terminal to confirm on", file=sys.stderr)
            return EXIT_ERROR
        answer = input(f"Delete all {count} API keys of account {args.account_id}? Bots using them stop. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing deleted.")
            return EXIT_ERROR
    deleted = client.delete_all_keys(args.account_id)
    print(f"Deleted {deleted} key{'s' if deleted != 1 else ''} of account {args.account_id}.")
    return 0


def _addresses_add(client: Client, args: argparse.Namespace) -> int:
    entry = client.add_withdrawal_address(args.account_id, args.asset, args.address, memo=args.memo, label=args.label)
    if args.json:
        _print_json(_jsonable(entry))
    else:
        print(f"Whitelisted {entry.asset} address {entry.address} (id {entry.id}).")
        if entry.usable_from and entry.usable_from > datetime.now(UTC):
            print(f"Withdrawals to it are on hold until {_time(entry.usable_from)}.")
    return 0


def _addresses_list(client: Client, args: argparse.Namespace) -> int:
    entries = client.list_withdrawal_addresses(args.account_id)
    if args.json:
        _print_json([_jsonable(e) for e in entries])
    elif not entries:
        print(f"Account {args.account_id} has no whitelisted withdrawal addresses.")
    else:
        _print_table(["ID", "ASSET", "ADDRESS", "MEMO", "LABEL", "USABLE"], [_address_row(e) for e in entries])
    return 0


def _addresses_remove(client: Client, args: argparse.Namespace) -> int:
    client.remove_withdrawal_address(args.account_id, args.address_id)
    print(f"Removed whitelisted address {args.address_id}.")
    return 0


def _address_management(client: Client, args: argparse.Namespace) -> int:
    if args.state == "status":
        settings = client.get_account_settings(args.account_id)
    else:
        settings = client.set_address_management(args.account_id, args.state == "on")
    if args.json:
        _print_json(_jsonable(settings))
    else:
        state = "on" if settings.address_management else "off"
        print(f"Address management for account {settings.account_id} is {state}.")
        if settings.address_management_off_at:
            print(f"It turns off at {_time(settings.address_management_off_at)} (`address-management on` cancels).")
    return 0


def _accounts_show(client: Client, args: argparse.Namespace) -> int:
    settings = client.get_account_settings(args.account_id)
    if args.json:
        _print_json(_jsonable(settings))
        return 0
    management = "on" if settings.address_management else "off"
    if settings.address_management_off_at:
        management += f" (turns off at {_time(settings.address_management_off_at)})"
    print(f"Account:            {settings.account_id}")
    print(f"API access:         {'FROZEN (every key refused)' if settings.frozen else 'active'}")
    print(f"Address management: {management}")
    print(f"Keys:               {settings.key_count} of {settings.max_keys}")
    return 0


def _accounts_freeze(client: Client, args: argparse.Namespace) -> int:
    if args.frozen:
        settings = client.freeze_account(args.account_id, args.reason)
    else:
        settings = client.unfreeze_account(args.account_id, args.reason)
    if args.json:
        _print_json(_jsonable(settings))
    elif settings.frozen:
        print(f"Account {settings.account_id} is frozen: every API key of it is refused until unfrozen.")
    else:
        print(f"Account {settings.account_id} is not frozen: its API keys work again.")
    return 0


def _authorize(client: Client, args: argparse.Namespace) -> int:
    destination = None
    if args.asset is not None or args.address is not None:
        destination = WithdrawalDestination(args.asset or "", args.address or "", args.memo)
    result = client.authorize(
        args.access_key, args.private_key, args.ip, args.permission, destination, symbol=args.symbol
    )
    if args.json:
        _print_json(_jsonable(result))
    elif result.allowed:
        assert result.permission is not None
        print(f"ALLOW: key {result.key_name!r} of account {result.account_id} ({result.permission.name})")
    else:
        print(f"DENY: {result.decision.name}")
    return 0 if result.allowed else EXIT_DENIED


def _audit(client: Client, args: argparse.Namespace) -> int:
    events: list[AuditEvent] = []
    token = ""
    while len(events) < args.limit:
        page, token = client.list_audit_events(
            args.account_id, page_size=min(args.limit - len(events), 500), page_token=token
        )
        events += page
        if not token:
            break
    if args.json:
        _print_json([_jsonable(e) for e in events])
        return 0
    rows = [
        [
            _time(e.time),
            _quoted(e.caller),
            e.action.name,
            _quoted(e.account_id),
            _quoted(e.access_key) if e.access_key else "-",
            _details_text(e.details) or "-",
        ]
        for e in events
    ]
    _print_table(["TIME", "CALLER", "ACTION", "ACCOUNT", "ACCESS KEY", "DETAILS"], rows)
    return 0


# What a text value may hold and still be printed as it is (see `keyguard audit --help`).
_PLAIN_PUNCTUATION = "._:/@+,-"
_PLAIN = re.compile(rf"[A-Za-z0-9{re.escape(_PLAIN_PUNCTUATION)}]+")


def _quoted(text: str) -> str:
    """``text`` as it is when it is plain, else as a JSON string (ASCII only: every control,
    non-ASCII or invisible character escaped), so that no text, a key's name or a memo, can pass
    for a ``k=v`` pair, a column or a line of its own."""
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def _details_text(details: Mapping[str, str]) -> str:
    """An audit event's details as ``key=value`` pairs, sorted by key, each part quoted if not plain."""
    return " ".join(f"{_quoted(k)}={_quoted(v)}" for k, v in sorted(details.items()))


def _print_key(key: ApiKey) -> None:
    print(f"Access key:  {key.access_key}")
    print(f"Account:     {key.account_id}")
    print(f"Name:        {key.name}")
    print(f"Permission:  {key.permission.name}")
    print(f"Allowed IPs: {', '.join(key.allowed_ips) or 'any'}")
    print(f"Symbols:     {', '.join(key.symbols) or 'any'}")
    if key.unrestricted_until:
        print(f"Trading without an IP allowlist until {_time(key.unrestricted_until)} (then IP_RESTRICTION_REQUIRED)")
    print(f"Created:     {_time(key.created_at)}")
    print(f"Expires:     {_time(key.expires_at) if key.expires_at else 'never'}")
    print(f"Enabled:     {'yes' if key.enabled else 'no (refused until enabled)'}")
    print(f"Last used:   {_last_used(key)}")
    if key.previous_key_valid_until:
        print(f"Previous private key works until {_time(key.previous_key_valid_until)}")


def _address_row(entry: WithdrawalAddress) -> list[str]:
    usable = entry.usable_from
    when = _time(usable) if usable and usable > datetime.now(UTC) else "now"
    return [str(entry.id), entry.asset, entry.address, entry.memo or "-", entry.label or "-", when]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _status(key: ApiKey) -> str:
    if not key.enabled:
        return "disabled"
    if key.unrestricted_until is not None and key.unrestricted_until <= datetime.now(UTC):
        return "needs IPs"  # trade and withdraw refused until an allowlist is set
    if key.expires_at is not None:
        return "expired" if key.expires_at <= datetime.now(UTC) else f"until {key.expires_at:%Y-%m-%d}"
    return "active"


def _last_used(key: ApiKey) -> str:
    return f"{_time(key.last_used_at)} from {key.last_used_ip}" if key.last_used_at else "never"


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


if __name__ == "__main__":
    sys.exit(main())
