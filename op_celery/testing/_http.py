"""The stand-in's HTTP/1.1 plumbing: a loopback server, one thread per connection, and framing.

`LoopbackHTTPServer` accepts connections until told to stop, gives each its own daemon thread,
and can close and join them all. Its handler reads the request (``content-length`` or chunked,
413 past `MAX_BODY_BYTES`), hands ``/__stand-in/...`` to `control_answer` and ``POST /track``
to the `ApiModel`, holds the answer for the model's latency, writes it in one piece, and notes
one line per request in a `RequestLog` when it has one. It decides nothing about the API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import selectors
import socket
import socketserver
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Final
from urllib.parse import urlsplit

from op_celery.testing._answers import Answer, json_answer, phrase
from op_celery.testing._control import CONTROL_PREFIX, control_answer
from op_celery.testing._log import RequestLog, format_line
from op_celery.testing._model import ApiModel, Received

__all__ = ["HOST", "JOIN_TIMEOUT_SECONDS", "LoopbackHTTPServer"]

#: Address the server binds to; loopback only, so a test server is never reachable from outside.
HOST: Final = "127.0.0.1"
#: Largest request body read, in bytes (fastify's default ``bodyLimit``); larger ones get 413.
MAX_BODY_BYTES: Final = 1_048_576
#: Most bytes of a too-large body read and thrown away so the 413 reaches the client.
MAX_DISCARD_BYTES: Final = 64 * 1_048_576
#: How long stop() waits for the threads it ends, in seconds: the accept loop, then all the
#: connection threads together.
JOIN_TIMEOUT_SECONDS: Final = 5.0
#: Listen backlog; the stdlib default of 5 drops SYNs when a benchmark opens many connections.
LISTEN_BACKLOG: Final = 128


class LoopbackHTTPServer(HTTPServer):
    """``HTTPServer`` with one daemon thread per connection that stop() can close and join.

    Not ``ThreadingHTTPServer``: it keeps no handle on open sockets, so idle keep-alive
    connections would keep their threads blocked in ``readline`` after shutdown. Not
    ``serve_forever`` either: it notices ``shutdown()`` only every ``poll_interval``, which
    would add that much to every test's teardown; a wake-up socket ends our loop at once.
    """

    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], model: ApiModel, request_log: RequestLog | None = None
    ) -> None:
        self.model = model
        self.request_log = request_log
        self._open: set[socket.socket] = set()  # sockets a connection thread still serves
        self._threads: set[threading.Thread] = set()  # connection threads not yet seen to end
        self._open_lock = threading.Lock()
        self._closing = threading.Event()
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(address, _Handler)

    def accept_until_closed(self) -> None:
        """Accept connections until `stop_accepting`; each gets its own thread."""
        # Non-blocking, so a client that resets between select and accept cannot block the loop.
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self.socket and not self._closing.is_set():
                        self._accept_one()

    def _accept_one(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return  # the client gave up before we accepted
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def stop_accepting(self) -> None:
        """Make `accept_until_closed` return promptly."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def hold(self, seconds: float) -> bool:
        """Sleep unless `stop_accepting` comes first; False if it did (then answer nothing)."""
        # An Event wait, not time.sleep, so stopping wakes sleeping requests at once.
        if seconds > 0:
            return not self._closing.wait(seconds)
        return not self._closing.is_set()

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn, which can take seconds
        # without DNS; the name is only used for SERVER_NAME, which nothing here reads.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.socket.getsockname()[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        # Without TCP_NODELAY a keep-alive answer waits ~40 ms for Nagle and delayed ACKs.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # BSD and macOS pass the listener's non-blocking mode on to accepted sockets.
        request.setblocking(True)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"op-celery-stand-in:{self.server_port}:connection",
            daemon=True,
        )
        with self._open_lock:
            self._open.add(request)
            # A thread leaves _open before it ends; it stays here until it is seen to end.
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
        self.model._count_connection()
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up, or stop() closing the socket, is normal here, not an error.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def close_connections(self, timeout: float = JOIN_TIMEOUT_SECONDS) -> None:
        """Shut down every open connection so its thread leaves ``readline``, then join them.

        Every connection thread started is joined, not only those whose socket was still open:
        a thread that has just closed its socket is still running its last lines. Call it
        after the accept loop has ended, so no thread starts meanwhile; waits ``timeout``
        seconds in all at most.
        """
        with self._open_lock:
            open_now, threads = list(self._open), list(self._threads)
        for sock in open_now:
            with contextlib.suppress(OSError):  # the client may have closed it already
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._open_lock:
            self._threads = {t for t in self._threads if t.is_alive()}


class _BadFraming(Exception):
    """The request body cannot be read; answer ``answer`` and close the connection."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


class _Handler(BaseHTTPRequestHandler):
    """Parses HTTP, reads the body and writes the answer; decisions live in the `ApiModel`."""

    protocol_version = "HTTP/1.1"
    server: LoopbackHTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        # Per-request logging to stderr costs throughput and floods test output.
        pass

    def _dispatch(self) -> None:
        outcome, received = self._serve()
        log = self.server.request_log
        if log is None:
            return
        is_control = urlsplit(self.path).path.startswith(CONTROL_PREFIX)
        client_id = None if is_control else self.headers.get("openpanel-client-id", "")
        kind = None if received is None else received.type
        name = None if received is None else received.payload.get("name")
        log.note(format_line(time.time(), self.command, self.path, outcome, client_id, kind, name))

    def _serve(self) -> tuple[int | str, Received | None]:
        """Answer one request; (status, or what happened instead, and the /track record)."""
        wall = time.time()
        model = self.server.model
        arrival = model._now()
        try:
            raw = self._read_body()
        except _BadFraming as exc:
            self._write(exc.answer)
            return exc.answer.status, None
        path = urlsplit(self.path).path
        if path.startswith(CONTROL_PREFIX):
            return self._write(control_answer(model, self.command, path, raw)), None
        if path != "/track" or self.command != "POST":
            message = f"Route {self.command}:{path} not found"
            content = {"message": message, "error": "Not Found", "statusCode": 404}
            return self._write(json_answer(404, content)), None
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        decision = model._decide(headers, raw, self.client_address[0], arrival, wall)
        if not self.server.hold(decision.latency):
            self.close_connection = True  # stopping: like a killed server, answer nothing
            return "unanswered", decision.received
        if decision.answer is None:
            model._record_drop()
            self.close_connection = True
            return "dropped", decision.received
        model._record(decision.received)
        return self._write(decision.answer), decision.received

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("content-length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError(length_header)
        except ValueError:
            raise _BadFraming(self._framing_error(400, "Invalid Content-Length")) from None
        if length > MAX_BODY_BYTES:
            self._discard(length)
            raise _BadFraming(self._framing_error(413, "Request body is too large"))
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ConnectionResetError("client closed the connection mid-body")
        return raw

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadFraming(self._framing_error(400, "Invalid chunk size")) from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers carry nothing the stand-in uses
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                self._discard(size)
                raise _BadFraming(self._framing_error(413, "Request body is too large"))
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _discard(self, length: int) -> None:
        """Read and forget ``length`` bytes (at most `MAX_DISCARD_BYTES`) before refusing them.

        Closing a socket with unread data sends a TCP reset, which can destroy the refusal
        before the client reads it; a client still sending would see a connection error.
        """
        remaining = min(length, MAX_DISCARD_BYTES)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65_536))
            if not chunk:
                return
            remaining -= len(chunk)

    @staticmethod
    def _framing_error(status: int, message: str) -> Answer:
        content = {"status": status, "error": "Error", "message": message}
        return dataclasses.replace(json_answer(status, content), close=True)

    def _write(self, answer: Answer) -> int:
        """Write ``answer`` in one piece; returns its status."""
        if answer.close:
            self.close_connection = True
        lines = [
            f"HTTP/1.1 {answer.status} {phrase(answer.status)}",
            f"content-type: {answer.content_type}",
            f"content-length: {len(answer.body)}",
            f"date: {formatdate(usegmt=True)}",
            "connection: close" if self.close_connection else "connection: keep-alive",
        ]
        lines.extend(f"{name}: {value}" for name, value in answer.headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # One write per answer: with TCP_NODELAY, separate writes for head and body would go
        # out as separate packets.
        self.wfile.write(head + answer.body)
        return answer.status
