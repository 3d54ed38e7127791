"""The runner's ComfyUI client without a ComfyUI: its websocket reader against a raw RFC 6455 server socket,
and its HTTP errors against a closed port."""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading

import pytest

from facebooth.runner.client import ComfyClient, ComfyUnreachableError
from facebooth.runner.server import find_free_port

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        return head + bytes([n]) + payload
    if n < 65536:
        return head + bytes([126]) + struct.pack(">H", n) + payload
    return head + bytes([127]) + struct.pack(">Q", n) + payload


def _accept_websocket(listener: socket.socket) -> socket.socket:
    """Accept one client and answer its upgrade request as RFC 6455 prescribes (written out, not a library)."""
    conn, _ = listener.accept()
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(4096)
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key"))
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID.encode()).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    return conn


def test_event_socket_reads_text_fragmented_and_long_frames_and_answers_pings():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    server = threading.Thread(target=lambda: accepted.append(_accept_websocket(listener)))
    server.start()
    client = ComfyClient(f"http://127.0.0.1:{port}")
    try:
        ev = client._open_events()
        server.join(5)
        assert ev is not None
        b = accepted[0]
        long_msg = {"type": "progress", "data": {"value": 1, "pad": "x" * 70000}}
        b.sendall(
            _frame(0x1, json.dumps({"type": "status"}).encode())
            + _frame(0x2, b"\x00preview")  # binary preview: skipped
            + _frame(0x1, b'{"type": "exe', fin=False) + _frame(0x0, b'cuting"}')
            + _frame(0x9, b"hi")  # ping
            + _frame(0x1, json.dumps(long_msg).encode())
        )
        got = [ev.receive(1.0) for _ in range(3)]
        assert got[0] == {"type": "status"}
        assert got[1] == {"type": "executing"}  # the fragments joined; the binary message before it skipped
        assert got[2] == long_msg  # 8-byte length form
        pong = b.recv(64)
        assert pong[0] == 0x8A and pong[1] & 0x80  # FIN+pong, masked as clients must
        assert ev.receive(0.1) is None  # nothing pending: times out quietly
        b.sendall(_frame(0x8, b""))
        b.close()  # a server closes the connection after its close frame
        with pytest.raises(OSError):
            ev.receive(1.0)
    finally:
        client.close()
        for s in accepted:
            s.close()
        listener.close()


def test_an_unreachable_server_raises_a_clear_error():
    client = ComfyClient(f"http://127.0.0.1:{find_free_port()}", timeout=5)
    try:
        with pytest.raises(ComfyUnreachableError, match="Cannot reach ComfyUI at http://127.0.0.1"):
            client.system_stats()
        assert client._open_events() is None  # no websocket either: progress then comes only at the end
    finally:
        client.close()
