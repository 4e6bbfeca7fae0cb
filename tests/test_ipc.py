"""Private channels: the per-server folder and secret, authenticated sockets that decode nothing
before a peer proves it holds the secret (and then only messages), and a client that fails fast
and reconnects in the background when its peer is replaced."""
from __future__ import annotations

import os
import pickle
import socket
import stat
import threading
import time
from multiprocessing.connection import Connection

import pytest

from saguaro.errors import PeerUnavailable
from saguaro.ipc import WireClient, connect, listen
from saguaro.messages import Done, EngineInfo, EngineInfoQuery, ResetEngine, encode
from saguaro.private_dir import remove_runtime_dir, runtime_dir, runtime_root, server_secret
from test_messages import MARKER, Hostile


class Engine:
    """A handler that records what reached it."""
    def __init__(self):
        self.seen = []

    def handle(self, msg):
        self.seen.append(msg)
        yield Done() if isinstance(msg, ResetEngine) else EngineInfo(vocab_size=7, max_seq_len=8, max_slots=1,
                                                                    max_draft_len=2)


def send_without_handshake(path, payload: bytes) -> None:
    """Connects and sends payload twice without proving anything; the server must hang up."""
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(path))
    conn = Connection(raw.detach())
    try:                            # the server may hang up before the second
        conn.send_bytes(payload)
        conn.send_bytes(payload)
    except OSError:
        pass
    with pytest.raises((EOFError, OSError)):
        for _ in range(3):
            conn.recv_bytes()
    conn.close()


@pytest.fixture
def folder(tmp_path):
    pid = os.getpid() + 10_000_000      # a server pid of our own that no process has
    d = runtime_dir(pid)
    yield d
    remove_runtime_dir(pid)


def test_private_folder_and_secret_are_owner_only(folder):
    assert stat.S_IMODE(os.stat(runtime_root()).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    secret = server_secret(folder)
    assert len(secret) == 64 and server_secret(folder) == secret          # created once
    assert stat.S_IMODE(os.stat(folder / "secret").st_mode) == 0o600


def test_folders_of_servers_that_are_gone_are_removed(folder):
    gone = runtime_root() / "999999999"
    gone.mkdir(mode=0o700)
    (gone / "target.sock").write_text("")
    runtime_dir(os.getpid() + 10_000_000)
    assert not gone.exists() and folder.exists()


def test_a_folder_others_can_enter_is_refused(folder):
    os.chmod(folder, 0o755)
    with pytest.raises(ValueError, match="0700"):
        runtime_dir(os.getpid() + 10_000_000)
    os.chmod(folder, 0o700)


def test_socket_answers_only_peers_with_the_secret(folder):
    engine = Engine()
    server = listen(folder / "target.sock", server_secret(folder), engine.handle, "target")
    try:
        assert stat.S_IMODE(os.stat(folder / "target.sock").st_mode) == 0o600
        # the secret: answers
        client = WireClient(lambda: connect(folder / "target.sock", server_secret(folder)), 5, "target")
        assert client.wait_connected(5)
        assert next(client(EngineInfoQuery())).vocab_size == 7
        client.close()
        # a wrong secret: refused
        with pytest.raises(OSError, match="authentication"):
            connect(folder / "target.sock", b"x" * 32)
        # no handshake at all, a pickle straight away: dropped, nothing decoded, nothing run
        if os.path.exists(MARKER):
            os.unlink(MARKER)
        send_without_handshake(folder / "target.sock", pickle.dumps(Hostile()))
        assert not os.path.exists(MARKER)
        assert len(engine.seen) == 1
    finally:
        server.close()
    assert not (folder / "target.sock").exists()


def test_ready_tells_without_waiting_whether_an_answer_has_arrived(folder):
    """The decoder reads a round it left unread once its answer is in (WireClient.ready)."""
    go = threading.Event()

    def handle(msg):
        go.wait(10)
        yield EngineInfo(vocab_size=7, max_seq_len=8, max_slots=1, max_draft_len=2)

    server = listen(folder / "target.sock", server_secret(folder), handle, "target")
    client = WireClient(lambda: connect(folder / "target.sock", server_secret(folder)), 5, "target")
    try:
        assert client.wait_connected(5)
        answers = client(EngineInfoQuery())
        time.sleep(0.05)
        assert not client.ready()                    # the peer is still working
        go.set()
        deadline = time.monotonic() + 5
        while not client.ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert client.ready() and next(answers).vocab_size == 7
    finally:
        client.close()
        server.close()


def test_an_authenticated_peer_sending_a_pickle_gets_an_error_and_runs_nothing(folder):
    engine = Engine()
    server = listen(folder / "target.sock", server_secret(folder), engine.handle, "target")
    try:
        conn = connect(folder / "target.sock", server_secret(folder))
        conn.send_bytes(pickle.dumps(Hostile()))
        from saguaro.messages import Failed, decode
        answer = decode(conn.recv_bytes())
        assert isinstance(answer, Failed) and "MessageError" in answer.error
        conn.send_bytes(encode(EngineInfoQuery()))             # the connection still serves
        assert isinstance(decode(conn.recv_bytes()), EngineInfo)
        conn.close()
        assert not os.path.exists(MARKER) and engine.seen == [EngineInfoQuery()]
    finally:
        server.close()


def test_a_lost_peer_fails_calls_at_once_and_is_reconnected_in_the_background(folder):
    path, secret = folder / "target.sock", server_secret(folder)
    first = Engine()
    server = listen(path, secret, first.handle, "target")
    client = WireClient(lambda: connect(path, secret), 5, "target", hello=ResetEngine())
    assert client.wait_connected(5)
    assert next(client(EngineInfoQuery())).max_slots == 1
    server.close()                              # the peer's process goes away ...
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable):
        for _ in range(3):                      # the open connection is noticed on use
            next(client(EngineInfoQuery()))
    with pytest.raises(PeerUnavailable, match="unavailable"):
        client(EngineInfoQuery())               # no connection: no waiting either
    assert time.monotonic() - t0 < 1.0
    second = Engine()
    server = listen(path, secret, second.handle, "target")   # ... and a new one takes its place
    try:
        assert client.wait_connected(10)
        assert next(client(EngineInfoQuery())).vocab_size == 7
        assert isinstance(second.seen[0], ResetEngine)        # hello came first
    finally:
        client.close()
        server.close()


def test_a_peer_replaced_while_idle_takes_the_next_call(folder):
    # the model behind the socket is reloaded between calls (the supervisor, an operator): the
    # first call after it failed as a lost peer (and with it the request that made it, though the
    # new peer was up before it came)
    path, secret = folder / "target.sock", server_secret(folder)
    server = listen(path, secret, Engine().handle, "target")
    client = WireClient(lambda: connect(path, secret), 5, "target", hello=ResetEngine())
    try:
        assert client.wait_connected(5)
        assert next(client(EngineInfoQuery())).max_slots == 1
        server.close()
        second = Engine()
        server = listen(path, secret, second.handle, "target")
        time.sleep(0.3)                             # the new peer is up; the client has not called since
        assert next(client(EngineInfoQuery())).vocab_size == 7
        assert isinstance(second.seen[0], ResetEngine) and isinstance(second.seen[1], EngineInfoQuery)
    finally:
        client.close()
        server.close()
