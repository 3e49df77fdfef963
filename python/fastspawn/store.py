"""The rendezvous key-value store, as a ``torch.distributed.Store``.

The launcher runs a :class:`StoreServer` (a C thread in the launcher process,
bound to an ephemeral port, so never "Address already in use") and every rank
connects a :class:`Store` to it. ``Store`` is a ``torch.distributed.Store``
subclass, so torch can rendezvous through it::

    store = fastspawn.store.Store.from_env()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)

Environment variables (set by fastspawn's launcher for each rank):

``FASTSPAWN_STORE_ADDR``
    Where the server listens: ``"host:port"`` (``"[::1]:port"`` for IPv6), or
    ``"unix:@name"`` / ``"unix:/path"`` for a Unix socket.
``FASTSPAWN_STORE_TOKEN``
    The server's token (random hex from ``getrandom()``). Every connection
    presents it first; a wrong one gets ``PermissionError``.
``FASTSPAWN_STORE_TIMEOUT``
    Optional: the default timeout in seconds (300 when unset).

Semantics follow torch's c10d stores: ``get``/``wait``/``multi_get`` block
until the keys exist or the timeout passes; ``add`` keeps a decimal counter
(``get`` of it returns ``b"3"``); ``compare_set`` with an empty ``expected``
creates a missing key. Timeouts are ``timedelta`` (or seconds); as in torch,
``timedelta(0)`` means no limit. A timeout raises :class:`StoreTimeoutError`,
which is both a ``TimeoutError`` and torch's ``DistStoreError`` (a plain
``RuntimeError`` on torch 2.1, which has no ``DistStoreError``; either way torch's
own ``except RuntimeError`` retry loops work), and names the missing keys. Limits:
keys up to 4096 bytes (UTF-8), values up to 64 MiB (the server's
``max_value_size``), 1024 keys per call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict

import torch.distributed as dist

from . import _C

__all__ = ["ENV_ADDR", "ENV_TIMEOUT", "ENV_TOKEN", "Store", "StoreServer", "StoreTimeoutError"]

ENV_ADDR = "FASTSPAWN_STORE_ADDR"
ENV_TOKEN = "FASTSPAWN_STORE_TOKEN"
ENV_TIMEOUT = "FASTSPAWN_STORE_TIMEOUT"

DEFAULT_TIMEOUT = timedelta(seconds=300)

#: What every timeout argument takes: a timedelta or seconds (None: the default).
Timeout: TypeAlias = timedelta | float | int | None
#: What a value may be: bytes-like, or a str (stored as UTF-8).
Value: TypeAlias = bytes | bytearray | memoryview | str


# Stores that torch may still call from C++ (see Store.__init__).
_ALIVE: dict[int, Store] = {}


# What torch's own stores raise on a timeout: DistStoreError (a RuntimeError) in
# newer torch; torch 2.1 has no such class and raises a plain RuntimeError. The type
# checker sees the newer torch (this project's type checks run against it).
if TYPE_CHECKING:
    _DistStoreError: TypeAlias = dist.DistStoreError
else:
    _DistStoreError = getattr(dist, "DistStoreError", RuntimeError)


class StoreTimeoutError(TimeoutError, _DistStoreError):
    """A store call ran out of time. The message names the key(s) it waited for."""


_C._store_set_timeout_error(StoreTimeoutError)  # what every StoreClient timeout raises


def _as_timedelta(timeout: Timeout, what: str = "timeout") -> timedelta:
    if isinstance(timeout, timedelta):
        td = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        if math.isnan(timeout):
            raise ValueError(f"{what} must be a number of seconds or a timedelta, got nan")
        td = timedelta(seconds=timeout) if math.isfinite(timeout) else timedelta.max
    else:
        raise TypeError(
            f"{what} must be a datetime.timedelta or seconds, not {type(timeout).__name__}"
        )
    if td < timedelta(0):
        raise ValueError(f"{what} must be >= 0, got {td} (timedelta(0) means no limit)")
    return td


def _seconds(td: timedelta) -> float:
    # torch's kNoTimeout is 0; timedelta.max is "no limit" too.
    if td == timedelta(0) or td == timedelta.max:
        return math.inf
    return td.total_seconds()


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"unix:..."`` -> (host, port)."""
    if addr.startswith("unix:"):
        return addr, 0
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
    else:
        host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"store address {addr!r} is not 'host:port', '[ipv6]:port' or 'unix:PATH'"
        )
    return host, int(port)


def format_addr(host: str, port: int) -> str:
    """(host, port) as FASTSPAWN_STORE_ADDR spells it: parse_addr's inverse."""
    if host.startswith("unix:"):
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Store(dist.Store):
    """A client of a fastspawn :class:`StoreServer`, usable wherever torch wants a Store.

    ``Store(host, port, token, timeout=timedelta(seconds=300))`` connects
    (retrying with backoff for up to ``connect_timeout``, default 60 s) and
    authenticates. One instance is thread-safe (calls are serialised on its
    connection); :meth:`clone` opens another connection.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        timeout: Timeout = DEFAULT_TIMEOUT,
        *,
        connect_timeout: Timeout = None,
    ) -> None:
        super().__init__()
        td = _as_timedelta(timeout)
        ctd = None
        if connect_timeout is not None:
            ctd = _as_timedelta(connect_timeout, "connect_timeout")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty str, got {host!r}")
        if not isinstance(token, str) or not token:
            raise ValueError(f"token must be the server's token (a non-empty str); set {ENV_TOKEN}")
        self._host, self._port, self._token = host, int(port), token
        self._client = _C.StoreClient(
            host, self._port, token, timeout=_seconds(td),
            connect_timeout=None if ctd is None else _seconds(ctd),
        )
        # The timeout lives in the C++ base (torch reads it there); every call reads it back.
        super().set_timeout(td)
        # torch keeps only the C++ half of a Python store (PrefixStore, NCCL's
        # lazy communicator set-up). If the Python object is collected, torch's
        # trampoline finds no `set` and asserts "Not implemented." later, e.g.
        # at NCCL's first collective after `init_process_group(store=Store(...))`
        # with a temporary. So a Store stays alive until close().
        _ALIVE[id(self)] = self

    @classmethod
    def from_env(cls, timeout: Timeout = None, *, connect_timeout: Timeout = None) -> Store:
        """Connect to the launcher's store: FASTSPAWN_STORE_ADDR / _TOKEN (/ _TIMEOUT)."""
        addr = os.environ.get(ENV_ADDR)
        token = os.environ.get(ENV_TOKEN)
        if not addr or not token:
            missing = " and ".join(n for n, v in ((ENV_ADDR, addr), (ENV_TOKEN, token)) if not v)
            raise RuntimeError(
                f"{missing} not set: fastspawn's launcher sets them for each rank; outside it, "
                "pass host, port and token to fastspawn.store.Store(...)"
            )
        if timeout is None:
            env_t = os.environ.get(ENV_TIMEOUT)
            try:
                timeout = float(env_t) if env_t else DEFAULT_TIMEOUT
            except ValueError:
                raise ValueError(f"{ENV_TIMEOUT}={env_t!r} is not a number of seconds") from None
        host, port = parse_addr(addr)
        return cls(host, port, token, timeout, connect_timeout=connect_timeout)

    # -- helpers ------------------------------------------------------------

    if TYPE_CHECKING:
        # The C++ base's default timeout (torch's Store has it at run time; its stub
        # does not say so).
        @property
        def timeout(self) -> timedelta: ...

    def _t(self, timeout: Timeout = None) -> float:
        if timeout is None:
            return _seconds(self.timeout)
        return _seconds(_as_timedelta(timeout))

    @property
    def addr(self) -> str:
        """The server's address as FASTSPAWN_STORE_ADDR spells it."""
        return format_addr(self._host, self._port)

    def __repr__(self) -> str:
        return f"fastspawn.store.Store({self.addr!r}, timeout={self.timeout})"

    def __reduce__(self) -> tuple[Any, tuple[str, int, str, timedelta]]:
        # A Store sent to another process reconnects there.
        return (_reconnect, (self._host, self._port, self._token, self.timeout))

    # -- torch c10d Store API -------------------------------------------------

    def set(self, key: str, value: Value) -> None:
        """Store value under key (replacing it); wakes every waiter on key."""
        self._client.set(key, value, self._t())

    def get(self, key: str) -> bytes:
        """key's value, waiting (up to the timeout) until it is set."""
        return self._client.get(key, self._t())

    def add(self, key: str, value: int) -> int:
        """Add value to key's decimal counter (0 when missing) and return the sum."""
        return self._client.add(key, value, self._t())

    def compare_set(self, key: str, expected_value: Value, desired_value: Value) -> bytes:
        """Set key to desired_value if it holds expected_value (or is missing and
        expected_value is empty); returns what key holds afterwards."""
        return self._client.compare_set(key, expected_value, desired_value, self._t())

    def wait(self, keys: Sequence[str], timeout: Timeout = None) -> None:
        """Wait until every key exists (timeout: this call's, else the store's)."""
        self._client.wait(keys, self._t(timeout))

    def check(self, keys: Sequence[str]) -> bool:
        """Whether every key exists (does not wait)."""
        return self._client.check(keys, self._t())

    def delete_key(self, key: str) -> bool:
        """Delete key; whether it existed."""
        return self._client.delete_key(key, self._t())

    def num_keys(self) -> int:
        """How many keys the store holds."""
        return self._client.num_keys(self._t())

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        """The values of keys, in order, waiting until all are set (one round trip)."""
        return self._client.multi_get(keys, self._t())

    def multi_set(self, keys: Sequence[str], values: Sequence[Value]) -> None:
        """Set each key to its value (one round trip)."""
        self._client.multi_set(keys, values, self._t())

    def append(self, key: str, value: Value) -> None:
        """Append value to key's value (creating it when missing)."""
        self._client.append(key, value, self._t())

    def barrier(self, key: str, world_size: int, timeout: Timeout = None, *,
                rank: int | None = None) -> None:
        """Block until ``world_size`` ranks called it with this (single-use) key.

        With ``rank`` given, fastspawn's barrier runs in one C call and a
        timeout names the ranks that did not arrive; without it, the callers
        count themselves in with ``add`` and wait for the last one's mark
        (torch's own ``Store.barrier`` exists only in newer releases).
        """
        if rank is None:
            if self.add(f"{key}/count", 1) == world_size:
                self.set(f"{key}/done", b"1")
            self.wait([f"{key}/done"], self.timeout if timeout is None else timeout)
            return
        self._client.barrier(key, world_size, rank, self._t(timeout))

    def set_timeout(self, timeout: Timeout) -> None:
        """The default timeout of later calls (timedelta or seconds; 0: no limit)."""
        super().set_timeout(_as_timedelta(timeout))

    def has_extended_api(self) -> bool:
        """True: append, multi_get and multi_set are native (torch asks)."""
        return True

    def clone(self) -> Store:
        """A new connection to the same store (for use from another thread)."""
        return Store(self._host, self._port, self._token, self.timeout)

    def close(self) -> None:
        """Close the connection; calls blocked in other threads raise ConnectionError.
        torch must not use the store after this."""
        self._client.close()
        _ALIVE.pop(id(self), None)

    # torch's C++ side looks these up by their C++ names (PythonStore trampoline).
    getNumKeys = num_keys
    deleteKey = delete_key
    compareSet = compare_set


def _reconnect(host: str, port: int, token: str, timeout: timedelta) -> Store:
    return Store(host, port, token, timeout)


class _StartArgs(TypedDict):
    """StoreServer.start's keywords (fastspawn._C.StoreServer.start)."""

    host: str | None
    port: int
    token: str | None
    unix_path: str | None
    max_value_size: int
    auth_timeout: float
    max_unauth: int
    max_clients: int


class StoreServer:
    """The store server: a C thread serving keys until :meth:`shutdown`.

    ``StoreServer()`` binds 127.0.0.1 on a free port with a fresh random
    token. ``host=""`` binds every address (for other machines); ``unix_path``
    ``"@"`` also listens on an abstract Unix socket. Connections that have not
    authenticated get ``auth_timeout`` seconds (default 5) and at most
    ``max_unauth`` of them are kept (default 64; a new one closes the oldest);
    ``max_clients`` bounds the authenticated ones (default: half the process's
    RLIMIT_NOFILE). Use as a context manager::

        with StoreServer() as server:
            os.environ.update(server.env())
            store = server.client()
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = 0,
        token: str | None = None,
        *,
        unix_path: str | None = None,
        max_value_size: int | None = None,
        auth_timeout: float = 0.0,
        max_unauth: int | None = None,
        max_clients: int | None = None,
        start: bool = True,
    ) -> None:
        self._srv = _C.StoreServer()
        self._args: _StartArgs = {
            "host": host, "port": port or 0, "token": token, "unix_path": unix_path,
            "max_value_size": max_value_size or 0, "auth_timeout": auth_timeout,
            "max_unauth": max_unauth or 0, "max_clients": max_clients or 0}
        if start:
            self.start()

    def start(self) -> tuple[str, int]:
        """Start serving; returns the bound (host, port)."""
        return self._srv.start(**self._args)

    def shutdown(self) -> None:
        """Stop the thread and close every connection (clients get ConnectionError)."""
        self._srv.shutdown()

    def __enter__(self) -> StoreServer:
        if not self._srv.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def host(self) -> str:
        """The bound numeric address (RuntimeError while not running)."""
        return self._srv.host

    @property
    def port(self) -> int:
        """The bound port (RuntimeError while not running)."""
        return self._srv.port

    @property
    def token(self) -> str | None:
        """The token clients present (None before the first start())."""
        return self._srv.token

    @property
    def unix_path(self) -> str | None:
        """The Unix socket ("@name" or a path), or None."""
        return self._srv.unix_path

    @property
    def running(self) -> bool:
        """Whether the server thread serves."""
        return self._srv.running

    @property
    def num_clients(self) -> int:
        """Open connections."""
        return self._srv.num_clients

    def _live_token(self) -> str:
        """The token, for env() and client(), which need a running server: their host
        (or unix_path) lookup fails first when it never ran."""
        token = self._srv.token
        if token is None:
            raise RuntimeError("StoreServer is not running (call start())")
        return token

    def stats(self) -> dict[str, int]:
        """What the server holds: ``clients`` (authenticated), ``unauth``, ``parked``
        requests, ``out_bytes`` queued for clients, and the connections ``evicted``
        (unauthenticated: the cap or the hello deadline), ``shed`` (no descriptor left)
        and ``refused`` (at ``max_clients``) so far."""
        return self._srv.stats()

    @property
    def addr(self) -> str:
        """The TCP address as FASTSPAWN_STORE_ADDR spells it."""
        return format_addr(self.host, self.port)

    @property
    def unix_addr(self) -> str | None:
        """The Unix socket as FASTSPAWN_STORE_ADDR spells it ("unix:@name"), or None."""
        p = self.unix_path
        return None if p is None else "unix:" + p

    def env(self, *, prefer_unix: bool = False) -> dict[str, str]:
        """The variables :meth:`Store.from_env` reads."""
        addr = self.unix_addr if prefer_unix and self.unix_path else self.addr
        assert addr is not None  # (unix_addr is None only without a unix_path)
        return {ENV_ADDR: addr, ENV_TOKEN: self._live_token()}

    def client(self, timeout: Timeout = DEFAULT_TIMEOUT, *, prefer_unix: bool = False) -> Store:
        """A :class:`Store` connected to this server."""
        if prefer_unix and self.unix_path:
            unix_addr = self.unix_addr
            assert unix_addr is not None  # (there is a unix_path)
            return Store(unix_addr, 0, self._live_token(), timeout)
        return Store(self.host, self.port, self._live_token(), timeout)

    def __repr__(self) -> str:
        state = f"{self.addr}" if self.running else "stopped"
        return f"fastspawn.store.StoreServer({state})"
