"""A TCP proxy on loopback that can "go down": tests put it between shardtune and the S3
endpoint (moto keeps objects in memory, so the server itself must keep running). While down it
refuses new connections (the listening socket is closed) and cuts the open ones. It can also
answer requests itself with an S3 error (a 503 SlowDown, say) without passing them on."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FlakyProxy:
    """`FlakyProxy(upstream_port).start()`; `endpoint_url` goes where the S3 endpoint went.
    `go_down_on(marker, nth, seconds, methods)` arms an outage that starts when the `nth`
    request of one of `methods` (GET by default) whose first line contains `marker` arrives
    (that request is cut too): methods=("PUT", "POST") starts it during an upload, multipart
    parts included. `answer_errors(n, status, code)` answers the next n requests itself."""

    def __init__(self, upstream_port: int, max_connections: int = 64):
        self.upstream = ("127.0.0.1", upstream_port)
        self.max_connections = max_connections
        self._listener: socket.socket | None = None
        self._port = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._up_at = 0.0  # monotonic time the current outage ends
        self._armed: tuple[bytes, int, float, tuple[bytes, ...]] | None = None
        self._errors: tuple[int, int, str] | None = None  # (left, HTTP status, S3 error code)
        self.matched = 0  # requests seen that matched the armed marker
        self.outages: list[tuple[float, float]] = []  # (start, end), monotonic

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FlakyProxy:
        self._listen()
        threading.Thread(target=self._accept_loop, name="flaky-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            listener, self._listener = self._listener, None
        if listener:
            listener.close()
        self._cut_all()

    def go_down_on(
        self, marker: str, nth: int, seconds: float, methods: tuple[str, ...] = ("GET",)
    ) -> None:
        self._armed = (marker.encode(), nth, seconds, tuple(f"{m} ".encode() for m in methods))

    def answer_errors(self, count: int, status: int = 503, code: str = "SlowDown") -> None:
        """The next `count` requests get `status` with an S3 error body of `code` from the
        proxy (the store never sees them), as a throttling or failing S3 front end answers."""
        self._errors = (count, status, code)

    def down_for(self, seconds: float) -> None:
        with self._lock:
            self._up_at = time.monotonic() + seconds
            self.outages.append((time.monotonic(), self._up_at))
            listener, self._listener = self._listener, None
        if listener:
            listener.close()
        self._cut_all()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self._port))
        s.listen(64)
        s.settimeout(0.1)
        self._port = s.getsockname()[1]
        self._listener = s

    def _cut_all(self) -> None:
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                sock.close()  # linger 0: the peer sees a reset, as when a server dies

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if self._listener is None:
                if time.monotonic() < self._up_at:
                    time.sleep(0.05)
                    continue
                self._listen()
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if len(self._open) >= 2 * self.max_connections:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self._errors and self._errors[0] > 0:
                    self._answer_error(src, head_request=data.startswith(b"HEAD "))
                    break
                if from_client and self._armed and self._matches(data):
                    self.down_for(self._armed[2])
                    self._armed = None
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)

    def _answer_error(self, client: socket.socket, head_request: bool) -> None:
        with self._lock:
            left, status, code = self._errors
            self._errors = (left - 1, status, code)
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                f"<Message>injected by FlakyProxy</Message></Error>").encode()  # fmt: skip
        head = (f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        client.sendall(head if head_request else head + body)  # a HEAD answer has no body

    def _matches(self, data: bytes) -> bool:
        marker, nth, _, methods = self._armed
        first_line = data.split(b"\r\n", 1)[0]
        if first_line.startswith(methods) and marker in first_line:
            self.matched += 1
            return self.matched >= nth
        return False
