"""CURVE keys: the generated layout and permissions, when keys are required, the allow list
and its ZAP decisions, and the coordinator binding agent sessions to the key that sent them."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils import z85

from orchestrator.auth import (
    KeyAuthenticator,
    client_keys,
    generate_keys,
    is_local_endpoint,
    load_key_pair,
    read_allow_list,
    server_keys,
)
from orchestrator.cli import build_parser, main
from orchestrator.coordinator import Coordinator
from orchestrator.core.lifecycle import RequestState
from orchestrator.errors import InvalidRequest
from orchestrator.protocol import (
    AgentId,
    Heartbeat,
    Register,
    RequestId,
    RunFinished,
    TokenChunk,
    Welcome,
    WireModel,
    encode,
)
from orchestrator.sessions import AgentSession
from orchestrator.settings import CoordinatorSettings, load_settings
from tests.factories import profile, record


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def public_key(path: Path) -> bytes:
    return zmq.auth.load_certificate(path)[0]


# --- keys generate ----------------------------------------------------------------------------


def test_generate_writes_the_layout_with_private_secrets(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, agents=["gpu-box", "pi"], clients=["laptop"])
    assert mode(keys / "server.key_secret") == 0o600
    assert mode(keys / "server.key") == 0o644
    for role, name in (("agents", "gpu-box"), ("agents", "pi"), ("clients", "laptop")):
        secret = keys / role / f"{name}.key_secret"
        allowed = keys / "allowed" / role / f"{name}.key"
        assert mode(secret) == 0o600 and mode(keys / role) == 0o700
        pair = load_key_pair(secret, "curve_secret_key")
        assert pair.name == name  # the agent's default name travels in its certificate
        assert public_key(allowed) == pair.public
        assert zmq.auth.load_certificate(allowed)[1] is None  # the allow list holds no secret
    server = load_key_pair(keys / "server.key_secret", "curve_secret_key")
    assert public_key(keys / "server.key") == server.public
    all_publics = {public_key(p) for p in keys.rglob("*.key")}
    assert len(all_publics) == 4  # server + three distinct identities
    assert not list(keys.glob(".keys-*"))  # no scratch folder left behind


def test_generate_defaults_then_adds_identities_and_never_overwrites(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generated = generate_keys(keys)
    assert (generated.agents, generated.clients) == (("agent-1",), ("client",))
    server_secret = (keys / "server.key_secret").read_bytes()
    agent_secret = (keys / "agents" / "agent-1.key_secret").read_bytes()

    with pytest.raises(InvalidRequest, match="already holds a server key"):
        generate_keys(keys)
    with pytest.raises(InvalidRequest, match=r"refusing to overwrite .*agent-1\.key_secret"):
        generate_keys(keys, agents=["new-box", "agent-1"])
    assert not (keys / "agents" / "new-box.key_secret").exists()  # all or nothing

    added = generate_keys(keys, agents=["gpu-box"])
    assert not added.server_created and added.agents == ("gpu-box",)
    assert (keys / "server.key_secret").read_bytes() == server_secret
    assert (keys / "agents" / "agent-1.key_secret").read_bytes() == agent_secret
    assert (keys / "allowed" / "agents" / "gpu-box.key").exists()


@pytest.mark.parametrize("name", ["../escape", ".hidden", "", "a/b", "x" * 65])
def test_generate_refuses_names_that_are_not_plain_file_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidRequest, match="identity name"):
        generate_keys(tmp_path / "keys", agents=[name])
    assert not (tmp_path / "keys").exists()


def test_keys_generate_command_says_what_to_copy_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "generate", str(keys), "--name", "gpu-box", "--client", "laptop"]) == 0
    out = capsys.readouterr().out
    assert f"--curve-secret-key {keys / 'server.key_secret'}" in out
    assert f"--curve-allow-dir {keys / 'allowed'}" in out
    assert str(keys / "agents" / "gpu-box.key_secret") in out
    assert str(keys / "clients" / "laptop.key_secret") in out
    assert main(["keys", "generate", str(keys), "--name", "gpu-box"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


# --- when keys are required -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.4.5:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/edgeorch.sock", True),
        ("inproc://agents", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://coordinator.lan:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_which_endpoints_other_machines_can_reach(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


def test_loopback_default_runs_without_keys() -> None:
    assert server_keys(CoordinatorSettings()) is None
    assert Coordinator(CoordinatorSettings())._keys is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "coordinator.lan"])
def test_reachable_endpoint_without_keys_refuses_to_start_and_says_how(host: str) -> None:
    settings = CoordinatorSettings(agents_endpoint=f"tcp://{host}:5555")
    with pytest.raises(InvalidRequest) as error:
        Coordinator(settings)
    message = error.value.message
    assert f"tcp://{host}:5555" in message
    assert "tcp://127.0.0.1:5556" not in message  # only the reachable endpoint is named
    for hint in ("edgeorch keys generate", "--curve-secret-key", "--curve-allow-dir", "--insecure"):
        assert hint in message


def test_insecure_opt_out_starts_with_a_loud_warning(caplog: pytest.LogCaptureFixture) -> None:
    args = build_parser().parse_args(
        ["coordinator", "--insecure", "--clients-endpoint", "tcp://0.0.0.0:5556"]
    )
    overrides = {k: v for k, v in vars(args).items() if k in CoordinatorSettings.model_fields}
    settings = load_settings(CoordinatorSettings, config=None, environ={}, overrides=overrides)
    assert settings.insecure is True
    with caplog.at_level(logging.WARNING, logger="edgeorch.auth"):
        assert server_keys(settings) is None
    assert "INSECURE" in caplog.text and "tcp://0.0.0.0:5556" in caplog.text
    from_env = load_settings(
        CoordinatorSettings, config=None, environ={"EDGEORCH_INSECURE": "1"}, overrides={}
    )
    assert from_env.insecure is True


def test_server_keys_need_both_settings_and_a_secret_certificate(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    secret, public, allow = keys / "server.key_secret", keys / "server.key", keys / "allowed"
    settings = CoordinatorSettings(curve_secret_key=str(secret), curve_allow_dir=str(allow))
    loaded = server_keys(settings)
    assert loaded is not None and loaded.allow_dir == allow
    with pytest.raises(InvalidRequest, match="curve_allow_dir is not set"):
        server_keys(CoordinatorSettings(curve_secret_key=str(secret)))
    with pytest.raises(InvalidRequest, match="only a public key"):
        server_keys(CoordinatorSettings(curve_secret_key=str(public), curve_allow_dir=str(allow)))
    with pytest.raises(InvalidRequest, match="cannot read a CURVE certificate"):
        server_keys(
            CoordinatorSettings(curve_secret_key=str(keys / "nope"), curve_allow_dir=str(allow))
        )
    with pytest.raises(InvalidRequest, match="is not a directory"):
        server_keys(CoordinatorSettings(curve_secret_key=str(secret), curve_allow_dir=str(public)))


def test_client_keys_are_both_or_neither(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    secret, server = keys / "clients" / "client.key_secret", keys / "server.key"
    assert client_keys(None, None) is None
    loaded = client_keys(secret, server)
    assert loaded is not None and loaded.server_public == public_key(server)
    with pytest.raises(InvalidRequest, match="curve_server_key is not set"):
        client_keys(secret, None)
    with pytest.raises(InvalidRequest, match="curve_secret_key is not set"):
        client_keys(None, server)


# --- the allow list and ZAP -------------------------------------------------------------------


def test_allow_list_names_come_from_file_names_and_a_shared_key_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, agents=["gpu-box", "pi"], clients=["laptop"])
    allow = keys / "allowed"
    allowed = read_allow_list(allow)
    gpu = public_key(allow / "agents" / "gpu-box.key")
    laptop = public_key(allow / "clients" / "laptop.key")
    assert allowed[gpu] == ("agents", "gpu-box") and allowed[laptop] == ("clients", "laptop")
    (allow / "clients" / "pi.key").write_bytes((allow / "agents" / "pi.key").read_bytes())
    (allow / "stray.key").write_bytes((allow / "agents" / "gpu-box.key").read_bytes())
    with caplog.at_level(logging.ERROR, logger="edgeorch.auth"):
        allowed = read_allow_list(allow)
    assert public_key(allow / "agents" / "pi.key") not in allowed  # ambiguous: which name?
    assert allowed[gpu] == ("agents", "gpu-box")  # files outside agents/ and clients/ ignored
    assert "hold the same key" in caplog.text


def test_zap_admits_a_key_only_on_its_roles_endpoint_and_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, agents=["gpu-box"], clients=["laptop"])
    context = zmq.asyncio.Context()
    try:
        zap = KeyAuthenticator(context, keys / "allowed")
        gpu = public_key(keys / "allowed" / "agents" / "gpu-box.key")
        laptop = public_key(keys / "allowed" / "clients" / "laptop.key")
        stranger, _ = zmq.curve_keypair()
        assert zap.callback("agents", gpu)
        assert zap.curve_user_id(z85.decode(gpu)) == "gpu-box"  # the frames' User-Id
        assert zap.callback("clients", laptop)
        with caplog.at_level(logging.DEBUG, logger="edgeorch.auth"):
            assert not zap.callback("clients", gpu)
            assert not zap.callback("agents", laptop)
            for _ in range(3):
                assert not zap.callback("agents", stranger)
        refusals = [r for r in caplog.records if r.getMessage().startswith("refused CURVE key")]
        assert [r.levelno for r in refusals] == [logging.WARNING] * 3 + [logging.DEBUG] * 2
        assert "allowed as agents 'gpu-box', not on the clients endpoint" in caplog.text
        # the allow list is re-read at every handshake: revoke, grant, no restart
        allowed_gpu = keys / "allowed" / "agents" / "gpu-box.key"
        certificate = allowed_gpu.read_bytes()
        allowed_gpu.unlink()
        assert not zap.callback("agents", gpu)
        (keys / "allowed" / "agents" / "broken.key").write_text("no key here\n")
        allowed_gpu.write_bytes(certificate)
        caplog.clear()
        for _ in range(3):
            assert zap.callback("agents", gpu)
        assert caplog.text.count("skipped") == 1  # a bad file is reported once, not per handshake
    finally:
        context.destroy(linger=0)


# --- the coordinator binds sessions to keys ---------------------------------------------------


def keyed_coordinator() -> tuple[Coordinator, list[tuple[bytes, WireModel]]]:
    sent: list[tuple[bytes, WireModel]] = []
    c = Coordinator(
        CoordinatorSettings(), agent_sink=lambda identity, message: sent.append((identity, message))
    )
    return c, sent


def session_on(c: Coordinator, identity: bytes) -> AgentSession:
    return next(s for s in c.agent_sessions() if s.identity == identity)


def register(c: Coordinator, identity: bytes, name: str, key: str | None) -> None:
    c.on_agent_frame(identity, encode(Register(name=name, profile=profile())), key)


def test_an_agent_registers_only_under_its_keys_name(caplog: pytest.LogCaptureFixture) -> None:
    c, sent = keyed_coordinator()
    register(c, b"conn-1", "gpu-box", "gpu-box")
    assert isinstance(sent[-1][1], Welcome) and sent[-1][1].agent_id == "gpu-box"
    assert session_on(c, b"conn-1").key == "gpu-box"
    sent.clear()
    with caplog.at_level(logging.WARNING, logger="edgeorch.coordinator"):
        register(c, b"conn-2", "gpu-box", "pi")
    assert sent == [] and all(s.identity != b"conn-2" for s in c.agent_sessions())
    assert "refused key pi registering as agent 'gpu-box'" in caplog.text


def test_a_frame_from_another_key_on_a_sessions_connection_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c, _ = keyed_coordinator()
    register(c, b"conn-1", "gpu-box", "gpu-box")
    session_on(c, b"conn-1").last_seen_s = -100.0
    with caplog.at_level(logging.WARNING, logger="edgeorch.coordinator"):
        c.on_agent_frame(b"conn-1", encode(Heartbeat(kv_used_tokens=5)), "pi")
        register(c, b"conn-1", "pi", "pi")  # nor may it take the session over
    session = session_on(c, b"conn-1")
    assert (session.agent_id, session.key, session.last_seen_s) == ("gpu-box", "gpu-box", -100.0)
    assert session.kv_used_tokens == 0
    assert "refused a frame from key pi on the connection of agent gpu-box" in caplog.text


@pytest.mark.parametrize("keys", [True, False])
def test_an_agent_cannot_speak_for_a_request_running_on_another(
    keys: bool, caplog: pytest.LogCaptureFixture
) -> None:
    c, _ = keyed_coordinator()
    register(c, b"conn-gpu", "gpu-box", "gpu-box" if keys else None)
    register(c, b"conn-pi", "pi", "pi" if keys else None)
    c.table.add(record("victim"))
    c.table.dispatch(RequestId("victim"), AgentId("gpu-box"), 100, now=0.0)
    claims = [
        TokenChunk(request_id="victim", attempt=1, text=" forged", n_tokens=1),
        RunFinished(
            request_id="victim",
            attempt=1,
            prompt_tokens=10,
            completion_tokens=1,
            finish_reason="stop",
            prefill_s=0.0,
            decode_s=0.0,
        ),
    ]
    with caplog.at_level(logging.WARNING, logger="edgeorch.coordinator"):
        for claim in claims:
            c.on_agent_frame(b"conn-pi", encode(claim), "pi" if keys else None)
    victim = c.table[RequestId("victim")]
    assert victim.text == "" and victim.state is RequestState.DISPATCHED
    assert caplog.text.count("refused agent pi's frame about request victim attempt 1") == 2
    c.on_agent_frame(
        b"conn-gpu",
        encode(TokenChunk(request_id="victim", attempt=1, text=" real", n_tokens=1)),
        "gpu-box" if keys else None,
    )
    assert victim.text == " real"
