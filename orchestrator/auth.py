"""CURVE authentication for agents and clients (CurveZMQ through pyzmq's ``zmq.auth``).

``edgeorch keys generate DIR`` writes this layout; a file's name is its identity::

    DIR/server.key_secret         the coordinator only          --curve-secret-key
    DIR/server.key                public: every agent, client   --curve-server-key
    DIR/agents/NAME.key_secret    agent NAME only               --curve-secret-key
    DIR/clients/NAME.key_secret   client NAME only              --curve-secret-key
    DIR/allowed/agents/NAME.key   the coordinator's allow list  --curve-allow-dir DIR/allowed
    DIR/allowed/clients/NAME.key

The coordinator's agents endpoint admits only keys in ``allowed/agents``, its clients endpoint
only keys in ``allowed/clients`` (the socket's ZAP domain is the role). ZAP stamps every frame
from an admitted connection with ``User-Id`` = the allowed file's name, so the coordinator knows
which key sent it, and an agent may register only under its key's name: one key cannot pose as
another agent. The allow list is re-read at each handshake: adding or removing a file takes
effect at the next connection without a restart (connections already open stay open).

Keys are required as soon as an endpoint is reachable from another machine (not loopback, ipc
or inproc); ``--insecure`` opts out with a warning. On loopback they stay optional.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from orchestrator.errors import EdgeorchError, InvalidRequest, Unauthorized

if TYPE_CHECKING:
    from orchestrator.settings import CoordinatorSettings

log = logging.getLogger("edgeorch.auth")

Role = Literal["agents", "clients"]
ROLES: Final[tuple[Role, ...]] = ("agents", "clients")
PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"
SERVER_NAME: Final = "server"
ALLOWED_DIR: Final = "allowed"
DEFAULT_AGENT_NAMES: Final = ("agent-1",)
DEFAULT_CLIENT_NAMES: Final = ("client",)
SECRET_FILE_MODE: Final = 0o600
SECRET_DIR_MODE: Final = 0o700
PUBLIC_FILE_MODE: Final = 0o644
Z85_KEY_CHARS: Final = 40
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Identity names become file names and agent names: no separators, no leading dot."""
REFUSALS_LOGGED: Final = 1024
"""Distinct refused keys logged as warnings; later ones go to debug (a rejected peer retries
its handshake every 100 ms, and a hostile one can mint keys)."""
UNEXPLAINED_FAILURES: Final = 3
"""Handshakes failing without a reason in a row before a peer concludes its keys are wrong (one
such failure can also be a dropped connection)."""
HANDSHAKE_EVENTS: Final = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A z85 key pair and the identity name recorded in its certificate (if any)."""

    public: bytes
    secret: bytes
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ServerKeys:
    keys: KeyPair
    allow_dir: Path


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What an agent or client needs: its own key pair and the coordinator's public key."""

    keys: KeyPair
    server_public: bytes


# --- loading ----------------------------------------------------------------------------------


def load_key_pair(path: str | Path, setting: str) -> KeyPair:
    """A ``.key_secret`` certificate; a public-only file is refused by name."""
    public, secret = _load_certificate(path, setting)
    if secret is None:
        raise InvalidRequest(
            f"{setting}: {path} holds only a public key; pass the .key_secret file",
            field=setting,
            path=str(path),
        )
    return KeyPair(public, secret, _metadata(Path(path)).get("name"))


def load_public_key(path: str | Path, setting: str) -> bytes:
    return _load_certificate(path, setting)[0]


def _load_certificate(path: str | Path, setting: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise InvalidRequest(
            f"{setting}: cannot read a CURVE certificate from {path}: {exc}",
            field=setting,
            path=str(path),
        ) from None
    for key in (public, secret):
        if key is not None and len(key) != Z85_KEY_CHARS:
            raise InvalidRequest(
                f"{setting}: {path} holds a key of {len(key)} characters, not {Z85_KEY_CHARS}",
                field=setting,
                path=str(path),
            )
    return public, secret


def _metadata(path: Path) -> dict[str, str]:
    """The ``metadata`` section of a zmq certificate (``zmq.auth`` does not parse it)."""
    fields: dict[str, str] = {}
    section = ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
        elif section == "metadata" and "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip().strip("\"'")
    return fields


def client_keys(secret_key: str | Path | None, server_key: str | Path | None) -> ClientKeys | None:
    """An agent's or client's keys from its two settings: both or neither."""
    if secret_key is None and server_key is None:
        return None
    if secret_key is None or server_key is None:
        missing = "curve_secret_key" if secret_key is None else "curve_server_key"
        raise InvalidRequest(
            "CURVE needs both curve_secret_key (this peer's .key_secret) and curve_server_key "
            f"(the coordinator's server.key); {missing} is not set",
            field=missing,
        )
    return ClientKeys(
        load_key_pair(secret_key, "curve_secret_key"),
        load_public_key(server_key, "curve_server_key"),
    )


def is_local_endpoint(endpoint: str) -> bool:
    """True when no other machine can reach ``endpoint``: ipc, inproc, or tcp on a loopback
    address or ``localhost``. ``*``, ``0.0.0.0``, LAN addresses, other host or interface names
    are reachable."""
    scheme, separator, address = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not separator:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_keys(settings: CoordinatorSettings) -> ServerKeys | None:
    """The coordinator's keys, None when it runs without CURVE, or ``InvalidRequest`` when an
    endpoint is reachable from other machines and no keys are set (unless ``insecure``)."""
    secret, allow = settings.curve_secret_key, settings.curve_allow_dir
    if secret is None and allow is None:
        exposed = [
            e
            for e in (settings.agents_endpoint, settings.clients_endpoint)
            if not is_local_endpoint(e)
        ]
        if not exposed:
            return None
        if settings.insecure:
            log.warning(
                "INSECURE (--insecure): %s accept anyone without keys; any machine that reaches "
                "them can submit work, read prompts and results, and pose as an agent",
                ", ".join(exposed),
            )
            return None
        raise InvalidRequest(
            f"refusing to listen on {', '.join(exposed)} without CURVE keys: any machine that "
            "reaches it could submit work, read prompts and pose as an agent. Create keys with "
            "`edgeorch keys generate DIR`, then start the coordinator with "
            "--curve-secret-key DIR/server.key_secret --curve-allow-dir DIR/allowed (agents and "
            "clients pass --curve-secret-key with their own .key_secret and --curve-server-key "
            "DIR/server.key); or bind 127.0.0.1 only; or pass --insecure to accept anyone",
            field="curve_secret_key",
            endpoints=", ".join(exposed),
        )
    if secret is None or allow is None:
        missing = "curve_secret_key" if secret is None else "curve_allow_dir"
        raise InvalidRequest(
            f"CURVE needs both curve_secret_key and curve_allow_dir; {missing} is not set",
            field=missing,
        )
    allow_dir = Path(allow)
    if not allow_dir.is_dir():
        raise InvalidRequest(
            f"curve_allow_dir {allow_dir} is not a directory", field="curve_allow_dir"
        )
    for role in ROLES:
        if not (allow_dir / role).is_dir():
            log.warning("%s has no %s/ folder: no %s can connect", allow_dir, role, role)
    return ServerKeys(load_key_pair(secret, "curve_secret_key"), allow_dir)


# --- the coordinator's side -------------------------------------------------------------------


def read_allow_list(allow_dir: Path) -> dict[bytes, tuple[Role, str]]:
    """z85 public key -> (role, name) from ``allow_dir/ROLE/NAME.key``; a key found in two
    files is ambiguous and refused."""
    found: dict[bytes, list[tuple[Role, str, Path]]] = {}
    for role in ROLES:
        for path in sorted((allow_dir / role).glob("*" + PUBLIC_SUFFIX)):
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as exc:
                log.warning("allow list: skipped %s: %s", path, exc)
                continue
            found.setdefault(public, []).append((role, path.name[: -len(PUBLIC_SUFFIX)], path))
    allowed: dict[bytes, tuple[Role, str]] = {}
    for public, entries in found.items():
        if len(entries) > 1:
            log.error(
                "allow list: %s hold the same key; it is refused",
                ", ".join(str(p) for _, _, p in entries),
            )
            continue
        role, name, _ = entries[0]
        allowed[public] = (role, name)
    return allowed


def _allow_files(allow_dir: Path) -> tuple[tuple[str, int, int, int], ...]:
    """(path, inode, size, mtime) of every allow-list file: cheap enough for each handshake."""
    files = []
    for role in ROLES:
        for path in sorted((allow_dir / role).glob("*" + PUBLIC_SUFFIX)):
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(files)


class KeyAuthenticator(AsyncioAuthenticator):
    """ZAP handler for the coordinator's context: a key is admitted on the endpoint whose ZAP
    domain is its role, and its connection's ``User-Id`` is its allow-list name."""

    def __init__(self, context: zmq.asyncio.Context, allow_dir: Path) -> None:
        super().__init__(context, log=logging.getLogger("edgeorch.auth.zap"))
        self.allow_dir = allow_dir
        self._names: dict[bytes, tuple[Role, str]] = {}
        self._files: tuple[tuple[str, int, int, int], ...] | None = None
        self._refusals_logged: set[bytes] = set()
        for role in ROLES:
            self.configure_curve_callback(role, self)

    def callback(self, domain: str, key: bytes) -> bool:
        """``zmq.auth``'s credentials-provider hook, once per handshake (z85 ``key``)."""
        files = _allow_files(self.allow_dir)
        if files != self._files:  # parse (and log its problems) only when it changed
            self._files, self._names = files, read_allow_list(self.allow_dir)
        entry = self._names.get(key)
        if entry is not None and entry[0] == domain:
            log.info("admitted %s key %s on the %s endpoint", entry[0], entry[1], domain)
            return True
        reason = (
            f"it is not in {self.allow_dir / domain}"
            if entry is None
            else f"it is allowed as {entry[0]} {entry[1]!r}, not on the {domain} endpoint"
        )
        first = key not in self._refusals_logged and len(self._refusals_logged) < REFUSALS_LOGGED
        if first:
            self._refusals_logged.add(key)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "refused CURVE key %s on the %s endpoint: %s",
            key.decode("ascii", "replace"),
            domain,
            reason,
        )
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        """Called right after ``callback`` admitted the key: its allow-list name."""
        return self._names[z85.encode(client_public_key)][1]


def secure_server(socket: zmq.Socket[Any], keys: KeyPair, role: Role) -> None:
    """Make a bound socket a CURVE server whose handshakes ZAP checks against ``role``."""
    socket.curve_server = True
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.zap_domain = role.encode()


def secure_client(socket: zmq.Socket[Any], keys: ClientKeys) -> None:
    socket.curve_secretkey = keys.keys.secret
    socket.curve_publickey = keys.keys.public
    socket.curve_serverkey = keys.server_public


# --- the connecting side ----------------------------------------------------------------------


def handshake_monitor(socket: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
    """The monitor ``handshake_failures`` reads; attach it before ``connect`` so that no
    handshake is missed (a socket has one monitor)."""
    return socket.get_monitor_socket(HANDSHAKE_EVENTS)


async def handshake_failures(
    socket: zmq.asyncio.Socket,
    endpoint: str,
    keys: ClientKeys | None,
    role: Role,
    *,
    monitor: zmq.asyncio.Socket | None = None,
    on_success: Callable[[], None] | None = None,
) -> AsyncIterator[EdgeorchError]:
    """One typed error per refused handshake of a connecting socket, explaining the cause;
    unexplained failures count only after ``UNEXPLAINED_FAILURES`` in a row. ``on_success``
    runs at every completed handshake (with or without CURVE), i.e. at every (re)connection."""
    monitor = monitor or handshake_monitor(socket)
    unexplained = 0
    try:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            kind, value = int(event["event"]), int(event["value"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                unexplained = 0
                if on_success is not None:
                    on_success()
                continue
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                unexplained += 1
                if unexplained < UNEXPLAINED_FAILURES:
                    continue
                unexplained = 0
            yield explain_handshake_failure(kind, value, endpoint, keys, role)
    finally:
        if not socket.closed:
            socket.disable_monitor()
        monitor.close(linger=0)


def explain_handshake_failure(
    kind: int, value: int, endpoint: str, keys: ClientKeys | None, role: Role
) -> EdgeorchError:
    who = "agent" if role == "agents" else "client"
    flag = "--name" if role == "agents" else "--client"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH and keys is not None:
        return Unauthorized(
            f"the coordinator at {endpoint} refused this {who}'s CURVE key "
            f"{keys.keys.public.decode()} (ZAP status {value}): its public certificate must be "
            f"in the coordinator's allow dir under {role}/ (`edgeorch keys generate DIR "
            f"{flag} NAME` writes DIR/allowed/{role}/NAME.key)",
            endpoint=endpoint,
            status=value,
        )
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and (
        value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
    ):
        if keys is None:
            return Unauthorized(
                f"the coordinator at {endpoint} requires CURVE keys: pass curve_secret_key "
                f"(this {who}'s .key_secret) and curve_server_key (the coordinator's server.key); "
                "`edgeorch keys generate DIR` creates them",
                endpoint=endpoint,
            )
        return Unauthorized(
            f"the coordinator at {endpoint} does not use CURVE keys, but this {who} has "
            "curve_secret_key and curve_server_key set: unset them, or start the coordinator "
            "with --curve-secret-key and --curve-allow-dir",
            endpoint=endpoint,
        )
    if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and keys is not None:
        return Unauthorized(
            f"the CURVE handshake with the coordinator at {endpoint} failed "
            f"{UNEXPLAINED_FAILURES} times in a row: curve_server_key "
            f"({keys.server_public.decode()}) is probably not this coordinator's server.key",
            endpoint=endpoint,
        )
    if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return Unauthorized(
            f"the handshake with the coordinator at {endpoint} failed {UNEXPLAINED_FAILURES} "
            "times in a row: if it requires CURVE keys, pass curve_secret_key (this "
            f"{who}'s .key_secret) and curve_server_key (the coordinator's server.key)",
            endpoint=endpoint,
        )
    return Unauthorized(
        f"the handshake with {endpoint} failed (ZeroMQ event {kind:#x}, value {value:#x}): "
        "is it an edgeorch coordinator, with the same security settings?",
        endpoint=endpoint,
        event=kind,
        value=value,
    )


# --- key generation ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GeneratedKeys:
    directory: Path
    server_created: bool
    agents: tuple[str, ...]
    clients: tuple[str, ...]


def generate_keys(
    directory: Path, agents: Sequence[str] = (), clients: Sequence[str] = ()
) -> GeneratedKeys:
    """Write the layout in the module docstring. The server key pair is created once and then
    kept; an identity whose secret already exists is refused (nothing is written then). With
    no names and no server key yet: agent ``agent-1`` and client ``client``."""
    server_exists = (directory / (SERVER_NAME + SECRET_SUFFIX)).exists()
    if not agents and not clients:
        if server_exists:
            raise InvalidRequest(
                f"{directory} already holds a server key; name the new identities with --name "
                "(agents) or --client (clients)",
                field="name",
            )
        agents, clients = DEFAULT_AGENT_NAMES, DEFAULT_CLIENT_NAMES
    wanted: list[tuple[Role, str]] = [("agents", n) for n in agents] + [
        ("clients", n) for n in clients
    ]
    for role, name in wanted:
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidRequest(
                f"identity name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
                field="name",
            )
        if wanted.count((role, name)) > 1:
            raise InvalidRequest(f"{role[:-1]} {name!r} is named twice", field="name")
        for path in (_secret_path(directory, role, name), _allowed_path(directory, role, name)):
            if path.exists():
                raise InvalidRequest(
                    f"refusing to overwrite {path}: {role[:-1]} {name!r} already has a key "
                    "(delete its files first to replace it)",
                    field="name",
                    path=str(path),
                )
    directory.mkdir(parents=True, exist_ok=True)
    if not server_exists:
        _create(directory, SERVER_NAME, directory, role=None)
    for role, name in wanted:
        folder = directory / role
        folder.mkdir(mode=SECRET_DIR_MODE, exist_ok=True)
        os.chmod(folder, SECRET_DIR_MODE)
        _create(directory, name, folder, role=role)
        allowed = _allowed_path(directory, role, name)
        allowed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / (name + PUBLIC_SUFFIX), allowed)
        os.chmod(allowed, PUBLIC_FILE_MODE)
    return GeneratedKeys(
        directory,
        not server_exists,
        tuple(n for r, n in wanted if r == "agents"),
        tuple(n for r, n in wanted if r == "clients"),
    )


def _secret_path(directory: Path, role: Role, name: str) -> Path:
    return directory / role / (name + SECRET_SUFFIX)


def _allowed_path(directory: Path, role: Role, name: str) -> Path:
    return directory / ALLOWED_DIR / role / (name + PUBLIC_SUFFIX)


def _create(directory: Path, name: str, folder: Path, *, role: Role | None) -> None:
    """``zmq.auth.create_certificates`` into a private (0700) scratch folder, secret set to
    0600 before it moves into place, so no other user can ever read it."""
    metadata = {"name": name} if role is None else {"name": name, "role": role[:-1]}
    with tempfile.TemporaryDirectory(dir=directory, prefix=".keys-") as scratch:
        public, secret = zmq.auth.create_certificates(scratch, name, metadata)
        os.chmod(secret, SECRET_FILE_MODE)
        os.chmod(public, PUBLIC_FILE_MODE)
        os.replace(secret, folder / (name + SECRET_SUFFIX))
        os.replace(public, folder / (name + PUBLIC_SUFFIX))


def describe(generated: GeneratedKeys) -> str:
    """What to copy where, for ``edgeorch keys generate``."""
    d = generated.directory
    lines = [f"CURVE keys in {d}:"]
    server = "created" if generated.server_created else "kept"
    lines += [
        f"  coordinator ({server}): keep {d / 'server.key_secret'} on the coordinator only",
        f"      edgeorch coordinator --curve-secret-key {d / 'server.key_secret'} "
        f"--curve-allow-dir {d / ALLOWED_DIR}",
        f"  every agent and client: copy {d / 'server.key'} (public) -> --curve-server-key",
    ]
    groups: tuple[tuple[Role, tuple[str, ...]], ...] = (
        ("agents", generated.agents),
        ("clients", generated.clients),
    )
    for role, names in groups:
        for name in names:
            secret = _secret_path(d, role, name)
            command = "edgeorch agent" if role == "agents" else "edgeorch submit|status"
            lines += [
                f"  {role[:-1]} {name}: copy {secret} to that machine only (mode 0600)",
                f"      {command} --curve-secret-key {name}{SECRET_SUFFIX} "
                "--curve-server-key server.key",
                f"      allowed by {_allowed_path(d, role, name)}",
            ]
    lines.append(
        f"The coordinator re-reads {d / ALLOWED_DIR} at each connection: delete a .key there "
        "to revoke it (open connections stay until they drop)."
    )
    return "\n".join(lines)
