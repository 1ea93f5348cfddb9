"""uvicorn's HTTP/1.1 protocol with a deadline for the request headers (slow-client defence).

uvicorn closes idle keep-alive connections but waits forever for the rest of a request's
headers, so a client sending one header byte every few seconds holds a connection (and a
file descriptor) indefinitely. :func:`header_timeout_protocol` gives each request
``timeout_s`` from its first byte (or from the connection, or from the previous answer) to
complete its headers; then the connection is closed.
"""

from __future__ import annotations

__all__ = ["header_timeout_protocol"]


def header_timeout_protocol(timeout_s: float) -> type:
    """A subclass of uvicorn's ``H11Protocol`` closing connections whose request headers are
    not complete within ``timeout_s`` seconds (pass it as ``uvicorn.Config(http=...)``).

    Example:
        >>> header_timeout_protocol(10.0).__name__
        'HeaderTimeoutProtocol'
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_deadline = None

        def _arm(self) -> None:
            self._disarm()
            self._header_deadline = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not None and self.cycle is not before:
                self._disarm()  # a complete request line and headers arrived

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request of a keep-alive connection

    return HeaderTimeoutProtocol
