"""A server and a client ``SSLObject`` joined by memory BIOs: the one pair
helper of the benchmark (``bench.py``), the soak (``soak.py``) and the tests
(``tests/conftest.py``, which import it with bench/ on their path)."""

from __future__ import annotations

import ssl


class BioPair:
    """A server and a client SSLObject joined by memory BIOs.

    Nothing moves on its own: ``client_to_server`` and ``server_to_client``
    carry what one side wrote to the other, and the methods below call them
    where a real network would deliver."""

    def __init__(
        self,
        server_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.s_in, self.s_out, self.c_in, self.c_out = (
            ssl.MemoryBIO() for _ in range(4)
        )
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.client = client_ctx.wrap_bio(
            self.c_in, self.c_out, server_hostname="localhost", session=session
        )

    def client_to_server(self) -> int:
        data = self.c_out.read()
        self.s_in.write(data)
        return len(data)

    def server_to_client(self) -> bytes:
        data = self.s_out.read()
        self.c_in.write(data)
        return data

    def pump(self) -> None:
        """Carry what each side wrote to the other."""
        self.client_to_server()
        self.server_to_client()

    def handshake(self) -> BioPair:
        """Drive both sides to completion WITHOUT moving anything the server
        writes after its handshake finished (left in s_out for inspection;
        the next ``server_to_client`` delivers it)."""
        server_done = client_done = False
        for _ in range(10):
            if not client_done:
                try:
                    self.client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            self.client_to_server()
            if not server_done:
                try:
                    self.server.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
                if not server_done or not client_done:
                    self.server_to_client()
            if server_done and client_done:
                return self
        raise AssertionError("handshake did not finish")

    def client_read(self) -> bytes | None:
        try:
            return self.client.read(65536)
        except ssl.SSLWantReadError:
            return None

    def exchange(self, data: bytes = b"x") -> BioPair:
        """The server writes ``data`` (any deferred tickets go first) and the
        client reads exactly that."""
        self.server.write(data)
        self.server_to_client()
        got = b""
        while len(got) < len(data):
            chunk = self.client_read()
            if not chunk:
                break
            got += chunk
        if got != data:
            raise AssertionError(f"the client read {got[:40]!r}, not the response")
        return self

    def request(self, data: bytes) -> BioPair:
        """The client writes ``data``; the server reads exactly that."""
        self.client.write(data)
        self.client_to_server()
        got = b""
        while len(got) < len(data):
            got += self.server.read(65536)
        if got != data:
            raise AssertionError(f"the server read {got[:40]!r}, not the request")
        return self

    def close(self) -> None:
        """close_notify both ways (client first)."""
        try:
            self.client.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.pump()
        self.server.unwrap()
        self.pump()
        self.client.unwrap()


def connect(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    data: bytes = b"x",
) -> BioPair:
    """A handshaken memory-BIO pair after one server-to-client ``exchange``
    (the server's first write: deferred tickets go with it)."""
    return BioPair(server_ctx, client_ctx, session).handshake().exchange(data)
