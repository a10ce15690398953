"""A storage endpoint that can be stopped for real: a TCP proxy in front of the loopback S3
server whose `stop` closes its port and drops every open connection (new connections are refused,
not stalled) and whose `start` opens the same port again, the server's data untouched; clearing
its `forwarding` event stalls instead (connections accepted, nothing relayed until it is set)."""

from __future__ import annotations

import socket
import threading


class StoppableProxy:
    """127.0.0.1:port -> the S3 server; `stop` closes the port and drops every connection,
    `start` opens the same port again; `forwarding` cleared: a stall."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.open: set[socket.socket] = set()
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            if listener is not None:
                try:  # wakes the thread blocked in accept(); close() alone keeps the port open
                    listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                listener.close()
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self.open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.forwarding.wait()  # a stall holds open connections too
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self.lock:
                self.open.discard(src)
