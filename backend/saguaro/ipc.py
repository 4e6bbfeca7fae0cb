"""Private channels between our processes: how peers prove who they are, and the request/answer
wire that runs over them (docs/design.md, "Processes and messages").

- The engine models' Unix sockets live in their tritonserver's private folder (saguaro.private_dir).
- Sockets authenticate both ends with the secret (HMAC challenges, multiprocessing's), and carry
  only saguaro.messages bytes: nothing received is unpickled.
- `serve_wire` answers messages on a connection; `WireClient` is its caller. A broken connection
  fails the call at once (PeerUnavailable) and is re-established in the background, so a round
  never waits for a peer to come back.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Callable, Iterator

from saguaro.errors import PeerUnavailable
from saguaro.messages import End, Failed, decode, encode


# -- sockets --------------------------------------------------------------------------------------

def listen(path: Path, secret: bytes, handle: Callable[[object], Iterator], name: str) -> "SocketServer":
    return SocketServer(path, secret, handle, name)


class SocketServer:
    """Answers saguaro.messages on a Unix socket, one thread per authenticated connection, one
    message at a time (one engine, however many connections). close() removes the socket file
    only if it is still ours (a replacement instance may have bound the path already)."""

    def __init__(self, path: Path, secret: bytes, handle: Callable[[object], Iterator], name: str):
        self.path, self.secret = path, secret
        if path.exists() or path.is_symlink():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self.inode = os.stat(path).st_ino
        self.conns: set[Connection] = set()
        lock = threading.Lock()

        def serialized(msg) -> Iterator:
            with lock:
                yield from handle(msg)

        self.handle = serialized
        threading.Thread(target=self._accept, name=f"saguaro-{name}-socket", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return                  # closed
            threading.Thread(target=self._serve, args=(Connection(sock.detach()),), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        self.conns.add(conn)
        try:
            deliver_challenge(conn, self.secret)     # the client proves it holds the secret,
            answer_challenge(conn, self.secret)      # then we do
        except Exception:               # wrong secret, garbage, or gone: drop it
            return
        else:
            serve_wire(conn, self.handle)
        finally:
            self.conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop listening and hang up on every peer (they see the engine gone, as if it had died)."""
        self.sock.close()
        for conn in list(self.conns):
            try:
                socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


def connect(path: Path, secret: bytes) -> Connection:
    """An authenticated connection to a SocketServer (raises OSError while nobody listens)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, secret)
        deliver_challenge(conn, secret)
    except Exception as e:
        conn.close()
        raise OSError(f"{path}: authentication failed ({type(e).__name__}: {e})") from None
    return conn


# -- the wire: request, answers, end ---------------------------------------------------------------

def serve_wire(conn: Connection, handle: Callable[[object], Iterator]) -> None:
    """Answer messages on a connection until it closes: each answer as soon as the handler yields
    it, then End; a failure (a bad message included) as one Failed answer."""
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            for answer in handle(decode(data)):
                conn.send_bytes(encode(answer))
            conn.send_bytes(encode(End()))
        except (EOFError, OSError, BrokenPipeError):
            return
        except Exception:
            try:
                conn.send_bytes(encode(Failed(traceback.format_exc())))
            except OSError:
                return


IDLE_RECONNECT_S = 0.25     # how long a call waits for a new connection when the idle one was closed


def _readable(conn: Connection) -> bool:
    """Whether a connection has something to read (or its end: EOF reads as readable)."""
    try:
        return conn.poll(0)
    except (EOFError, OSError):
        return True


class WireClient:
    """call(msg) -> iterator of a serve_wire peer's answers, read as they arrive.

    A closed connection, or an answer missing for timeout_s, raises PeerUnavailable at once and
    starts re-connecting in the background (`connect()` retried with backoff): calls until then
    raise PeerUnavailable without waiting. `hello` is sent on every new connection before any call
    (e.g. a reset: what the peer held for the broken connection is stale)."""

    def __init__(self, connect: Callable[[], Connection], timeout_s: float, peer: str, hello=None,
                 retry_s: tuple[float, float] = (0.1, 2.0)):
        self._connect, self.timeout_s, self.peer, self.retry_s = connect, timeout_s, peer, retry_s
        self.hello = hello
        self.conn: Connection | None = None
        self.open = False                # answers of the last call not read yet
        self.last_error = "not connected yet"
        self._connected, self._closed = threading.Event(), False
        self._lock = threading.Lock()
        self._reconnector: threading.Thread | None = None
        self._reconnect()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def __call__(self, msg) -> Iterator:
        conn = self.conn
        if conn is not None:
            try:
                while self.open:         # what the previous caller left unread, up to its end
                    self.open = not isinstance(self._recv(conn), (End, Failed))
                if _readable(conn):      # nothing is owed on an idle connection: the peer closed it
                    self._drop(conn, EOFError("the connection closed between calls"))
            except PeerUnavailable:      # (the peer closed it before the previous call's end)
                pass
            if self.conn is not conn:
                # The peer went away between calls (its model reloaded while we were idle): this
                # call, which no peer saw, goes to its successor if that is up.
                self._connected.wait(IDLE_RECONNECT_S)
                conn = self.conn
        if conn is None:
            raise PeerUnavailable(f"{self.peer} is unavailable ({self.last_error}); it is being restarted")
        try:
            conn.send_bytes(encode(msg))
        except OSError as e:
            self._broken(conn, e)
        self.open = True
        return self._answers(conn)

    def ready(self) -> bool:
        """Whether the open call's next answer has arrived (a broken connection counts: reading
        it raises at once)."""
        conn = self.conn
        try:
            return conn is None or not self.open or conn.poll(0)
        except (EOFError, OSError):
            return True

    def _answers(self, conn: Connection) -> Iterator:
        while self.open:
            answer = self._recv(conn)
            if isinstance(answer, End):
                self.open = False
            elif isinstance(answer, Failed):
                self.open = False
                raise PeerUnavailable(f"{self.peer} failed: {answer.error}")
            else:
                yield answer

    def _recv(self, conn: Connection):
        try:
            if not conn.poll(self.timeout_s):
                raise TimeoutError(f"no answer within {self.timeout_s} s")
            return decode(conn.recv_bytes())
        except (EOFError, OSError, TimeoutError) as e:
            self._broken(conn, e)

    def _broken(self, conn: Connection, e: BaseException):
        self._drop(conn, e)
        raise PeerUnavailable(f"{self.peer} is unavailable ({type(e).__name__}: {e})") from e

    def _drop(self, conn: Connection, e: BaseException) -> None:
        self.open = False
        if self.conn is conn:
            self.conn = None
            self._connected.clear()
            conn.close()                 # late answers must not be read as the next call's
            self.last_error = f"{type(e).__name__}: {e}"
            self._reconnect()

    def _reconnect(self) -> None:
        with self._lock:
            if self._closed or (self._reconnector and self._reconnector.is_alive()):
                return
            self._reconnector = threading.Thread(target=self._reconnect_loop, name=f"saguaro-{self.peer}-connect",
                                                 daemon=True)
            self._reconnector.start()

    def _reconnect_loop(self) -> None:
        delay = self.retry_s[0]
        while not self._closed:
            try:
                conn = self._connect()
                self._greet(conn)
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                time.sleep(delay)
                delay = min(delay * 2, self.retry_s[1])
                continue
            if self._closed:
                conn.close()
                return
            self.conn = conn
            self._connected.set()
            return

    def _greet(self, conn: Connection) -> None:
        if self.hello is None:
            return
        try:
            conn.send_bytes(encode(self.hello))
            while True:
                if not conn.poll(self.timeout_s):
                    raise TimeoutError(f"no answer to {type(self.hello).__name__} within {self.timeout_s} s")
                if isinstance(decode(conn.recv_bytes()), (End, Failed)):
                    return
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._closed = True
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
