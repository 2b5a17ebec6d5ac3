"""An httpx transport that sends through aiohttp's connection pool.

Why: httpcore 1.0's pool rescans every connection for every request, so
throughput falls past ~24 requests in flight (encode/httpx#3215; bench/submit.py shows it).
The code keeps httpx's API (requests, responses, exceptions, MockTransport in
tests); only the socket work is aiohttp's.

aiohttp's exceptions are mapped to httpx's here, and conservatively: only
failures that happen before a request can have left (no connection could be
made or borrowed) become ``ConnectError``/``ConnectTimeout``; everything
else, a connection reset included, becomes a read-side error, which the
client treats as "may have taken effect". Published mappings that turn
``ClientConnectionResetError`` into ``ConnectError`` would make a reset after
the request was sent look safe to retry, and post the note twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiohttp
import httpx
import yarl

# aiohttp computes these itself, or has already undone them (decompression).
_SKIP_REQUEST = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_SKIP_RESPONSE = frozenset({b"content-encoding", b"content-length", b"transfer-encoding"})


@contextlib.contextmanager
def map_aiohttp_exceptions() -> Iterator[None]:
    """Translate aiohttp failures into httpx's tree; the most specific class wins."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # pool wait or connect: nothing sent
        raise httpx.ConnectTimeout(str(exc) or "connect timeout") from exc
    except aiohttp.ClientConnectorError as exc:  # includes DNS and TLS handshake failures
        raise httpx.ConnectError(str(exc)) from exc
    except aiohttp.ServerTimeoutError as exc:  # sock_read: the request was sent
        raise httpx.ReadTimeout(str(exc) or "read timeout") from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise httpx.RemoteProtocolError(str(exc) or "server disconnected") from exc
    except aiohttp.ClientResponseError as exc:  # the response could not be parsed
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except aiohttp.InvalidURL as exc:
        raise httpx.UnsupportedProtocol(str(exc)) from exc
    except TimeoutError as exc:  # the overall deadline: may have been sent
        raise httpx.ReadTimeout("request deadline passed") from exc
    except (aiohttp.ClientError, OSError) as exc:  # resets, payload errors: after sending
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx transport over one ``aiohttp.ClientSession`` (created on first use, in the loop)."""

    def __init__(self, *, max_connections: int, keepalive_s: float = 4.0) -> None:
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        # Per-request work that is the same for every request to one URL, done once.
        self._urls: dict[str, yarl.URL] = {}
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            # Shorter than common servers' idle timeout (uvicorn: 5 s), so we close an
            # idle connection before the server does and never send on a dying one.
            keepalive_timeout=self._keepalive_s,
            ttl_dns_cache=300,
        )
        # No skip_auto_headers: it sends aiohttp down a slow path (a sorted copy of the
        # headers per request); httpx's request carries its own Accept and User-Agent.
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                   if k.lower() not in _SKIP_REQUEST]
        # httpx's own read of a request body is an async generator; a body held in
        # memory (the client's ByteStream) is read without one.
        body = (request.read() if isinstance(request.stream, httpx.SyncByteStream)
                else await request.aread())
        with map_aiohttp_exceptions():
            async with session.request(
                request.method, self._url(request.url), headers=headers, data=body or None,
                timeout=self._timeout(request), allow_redirects=False,
            ) as response:
                content = await response.read()
                status, raw_headers = response.status, response.raw_headers
        kept = [(k, v) for k, v in raw_headers if k.lower() not in _SKIP_RESPONSE]
        # Given as content, the body is already read: the caller's ``aread()`` returns it
        # without running httpx's async decoding pipeline over bytes aiohttp has decoded.
        return httpx.Response(status, headers=kept, content=content, request=request)

    def _url(self, url: httpx.URL) -> yarl.URL:
        text = str(url)
        found = self._urls.get(text)
        if found is None:
            found = yarl.URL(text, encoded=True)  # httpx has already quoted it
            if len(self._urls) < 1024:
                self._urls[text] = found
        return found

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        spec = request.extensions.get("timeout", {})
        key = (spec.get("connect"), spec.get("read"), spec.get("write"), spec.get("pool"))
        found = self._timeouts.get(key)
        if found is None:
            found = self._timeouts[key] = _timeout(*key)
        return found

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _timeout(connect: float | None, read: float | None, write: float | None,
             pool: float | None) -> aiohttp.ClientTimeout:
    # aiohttp has no write timeout, and an overall deadline would be one more timer per
    # request (2% of its CPU): a request is bounded by connect + the read timeout instead.
    del write
    return aiohttp.ClientTimeout(
        total=None,
        connect=(connect or 0) + (pool or 0) or None,  # pool wait + connect, nothing sent
        sock_connect=connect,
        sock_read=read,
    )
