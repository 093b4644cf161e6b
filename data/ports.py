"""Local TCP ports: a free one for a server we start (Ray's dashboard, the S3 server, Serve's
spare proxy port), and whether host:port can be listened on before minutes of start-up."""

from __future__ import annotations

import socket


def bind_port(host: str, port: int) -> int:
    """Bind a throwaway socket to host:port (0: any free port) and return the port bound;
    OSError when it cannot be (taken, or no such address). The host goes through getaddrinfo,
    so names and IPv6 addresses work as a server given them would."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        return sock.getsockname()[1]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (another process may take it before the
    caller does; every user here starts its server right away)."""
    return bind_port("127.0.0.1", 0)
