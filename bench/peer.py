"""A local socket peer that stands in for a guest's chardev in the bulk benchmark.

The emulated UART of the demo guest moves about 15 KB/s, far too little to find
the gateway's limits, so the bulk figures use this peer instead: a Unix socket
server that either side (the gateway's console hub, or the benchmark's direct
client) connects to exactly as it would to QEMU's `-serial unix:...,server=on`.

    python -m bench.peer PATH

listens on PATH (created atomically: it appears only once it accepts) and serves
each connection in its own thread until killed. A connection carries requests,
each 9 bytes: an operation byte and a big-endian u64 count.

- `S` send: write `count` bytes of the pattern as fast as the socket takes them.
- `R` receive: read `count` bytes, then answer one byte, `K`.
- `V` receive and verify: as `R`, but answer `X` instead of `K` if the bytes
  were not the pattern.

The pattern is the byte stream 0, 1, ..., 255, 0, 1, ... restarted at each request.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import threading

#: Largest chunk the peer writes or reads in one system call.
CHUNK = 1024 * 1024
#: Pattern bytes: long enough to hold a CHUNK starting at any phase 0..255.
PATTERN = bytes(range(256)) * (CHUNK // 256 + 1)
REQUEST = struct.Struct("!cQ")
SEND = b"S"
RECEIVE = b"R"
RECEIVE_VERIFY = b"V"
ACK = b"K"
BAD = b"X"


def request(op: bytes, count: int) -> bytes:
    """The 9-byte request for `op` (SEND, RECEIVE, RECEIVE_VERIFY) of `count` bytes."""
    return REQUEST.pack(op, count)


def pattern_matches(data: bytes | bytearray | memoryview, offset: int) -> bool:
    """Whether `data`, found at stream offset `offset`, is the pattern (len <= CHUNK)."""
    phase = offset % 256
    return memoryview(data) == memoryview(PATTERN)[phase : phase + len(data)]


def _recv_exactly(conn: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _send(conn: socket.socket, count: int) -> None:
    view = memoryview(PATTERN)
    sent = 0
    while sent < count:
        size = min(CHUNK, count - sent)  # CHUNK is a multiple of 256: phase stays 0
        conn.sendall(view[:size])
        sent += size


def _receive(conn: socket.socket, count: int, verify: bool) -> bool:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    got = 0
    good = True
    while got < count:
        size = conn.recv_into(view, min(CHUNK, count - got))
        if size == 0:
            raise ConnectionResetError("the client left in the middle of a request")
        if verify and good:
            good = pattern_matches(view[:size], got)
        got += size
    return good


def serve_connection(conn: socket.socket) -> None:
    """Answer requests on one connection until the other side closes it."""
    with conn, contextlib.suppress(OSError):
        while (header := _recv_exactly(conn, REQUEST.size)) is not None:
            op, count = REQUEST.unpack(header)
            if op == SEND:
                _send(conn, count)
            elif op in (RECEIVE, RECEIVE_VERIFY):
                good = _receive(conn, count, verify=op == RECEIVE_VERIFY)
                conn.sendall(ACK if good else BAD)
            else:
                return  # not a request: hang up


def serve(path: str) -> None:
    """Listen on `path` and serve every connection in a thread, forever."""
    staging = f"{path}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(staging)
    listener.listen(8)
    os.rename(staging, path)  # connectable from the moment the path exists
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.peer SOCKET_PATH", file=sys.stderr)
        return 2
    serve(args[0])
    return 0  # pragma: no cover - serve() returns only by being killed


if __name__ == "__main__":
    sys.exit(main())
