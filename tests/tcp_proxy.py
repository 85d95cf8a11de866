"""A small TCP proxy in front of the real PostgreSQL, which a test cuts and restores to
play a database outage: `cut()` resets every proxied connection and resets new ones at
once (as a server that is restarting would); `restore()` lets them through again.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        # A host that is a directory is a unix socket (the embedded server listens so).
        self.target = (target_host, target_port)
        self.unix = target_host.startswith("/")
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                _reset(client)
                continue
            try:
                server = self._connect()
            except OSError:
                _reset(client)
                continue
            with self.lock:
                self.pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _connect(self) -> socket.socket:
        if self.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(f"{self.target[0]}/.s.PGSQL.{self.target[1]}")
            return sock
        return socket.create_connection(self.target, timeout=5)

    def dsn(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by the proxy's."""
        params = conninfo_to_dict(dsn)
        params.update(host="127.0.0.1", port=str(self.port))
        params.pop("hostaddr", None)
        return make_conninfo(**params)

    @classmethod
    def in_front_of(cls, dsn: str) -> TcpProxy:
        params = conninfo_to_dict(dsn)
        host = str(params.get("host") or "/tmp").split(",")[0]
        return cls(host, int(str(params.get("port") or 5432).split(",")[0]))

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            _reset(a)
            _reset(b)

    def cut(self) -> None:
        """Drop every proxied connection now and refuse new ones until restore()."""
        self.up = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
