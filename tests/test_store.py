"""fastspawn.store: the C rendezvous store behind a torch.distributed.Store subclass."""
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import wait_until_in_poll
from fastspawn import _C
from fastspawn.store import Store, StoreServer, StoreTimeoutError, parse_addr

# What torch's stores raise on a timeout: DistStoreError in newer torch, a plain
# RuntimeError in torch 2.1 (which has no DistStoreError).
DistStoreError = getattr(dist, "DistStoreError", RuntimeError)

MAGIC = b"fastspawn-store/1"
OP_HELLO, OP_SET, OP_GET = 1, 2, 3


@pytest.fixture
def server():
    srv = StoreServer(auth_timeout=2.0)
    yield srv
    srv.shutdown()


@pytest.fixture
def store(server):
    s = server.client(timeout=timedelta(seconds=10))
    yield s
    s.close()


def frame(op, *args, rid=1):
    body = b"".join(struct.pack("<I", len(a)) + a for a in args)
    head = struct.pack("<IBBH", rid, op, 0, len(args))
    return struct.pack("<I", len(head) + len(body)) + head + body


def raw(server, hello_token=None):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    if hello_token is not None:
        sock.sendall(frame(OP_HELLO, MAGIC, hello_token.encode()))
        assert len(sock.recv(4096)) > 0
    return sock


def closed_by_server(sock, within=3.0):
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- every op ---------------------------------------------------------------


def test_every_op(store):
    assert isinstance(store, dist.Store)
    store.set("k", b"v")
    assert store.get("k") == b"v"
    store.set("s", "text")  # str values are UTF-8, like torch's Store.set
    assert store.get("s") == b"text"
    store.set("ba", bytearray(b"\x00\x01"))
    store.set("mv", memoryview(b"xyz")[1:])
    assert store.get("ba") == b"\x00\x01" and store.get("mv") == b"yz"
    store.set(b"bytes-key", b"")
    assert store.get("bytes-key") == b""

    assert store.add("ctr", 1) == 1
    assert store.add("ctr", 2) == 3
    assert store.get("ctr") == b"3"  # a decimal counter, like torch
    assert store.add("ctr", -5) == -2

    # compare_set, torch semantics
    assert store.compare_set("cas", "", "first") == b"first"
    assert store.compare_set("cas", "wrong", "second") == b"first"
    assert store.compare_set("cas", "first", "second") == b"second"
    assert store.compare_set("cas-missing", "x", "y") == b"x"
    assert not store.check(["cas-missing"])

    assert store.check(["k", "ctr"]) and not store.check(["k", "nope"])
    store.wait(["k", "ctr"])
    store.wait(["k"], timedelta(seconds=1))
    n = store.num_keys()
    assert store.getNumKeys() == n == 7
    assert store.delete_key("k") is True
    assert store.deleteKey("k") is False
    assert store.num_keys() == n - 1

    store.multi_set(["m1", "m2"], [b"1", "2"])
    assert store.multi_get(["m1", "m2"]) == [b"1", b"2"]
    store.append("log", b"ab")
    store.append("log", "cd")
    assert store.get("log") == b"abcd"
    assert store.has_extended_api()

    store.set_timeout(timedelta(seconds=7))
    assert store.timeout == timedelta(seconds=7)
    other = store.clone()
    assert other.get("m1") == b"1" and other.timeout == timedelta(seconds=7)
    other.close()


def test_large_value(store):
    big = os.urandom(8 << 20)
    store.set("big", big)
    assert store.get("big") == big
    assert store.multi_get(["big", "big"]) == [big, big]


def test_torch_prefix_store_drives_it_from_cpp(store):
    # PrefixStore calls our methods through torch's C++ trampoline: the path gloo takes.
    p = dist.PrefixStore("pre", store)
    p.set("a", "1")
    assert p.get("a") == b"1"
    assert store.get("pre/a") == b"1"
    assert p.add("n", 5) == 5
    p.wait(["a", "n"])
    p.wait(["a"], timedelta(seconds=1))
    if hasattr(p, "check"):  # torch 2.1 does not bind Store.check (C++ still calls ours)
        assert p.check(["a"]) and not p.check(["zz"])
    assert p.compare_set("c", "", "x") == b"x"
    assert p.num_keys() == store.num_keys()
    assert p.delete_key("a") and not p.delete_key("a")
    p.multi_set(["m"], ["v"])
    assert p.multi_get(["m"]) == [b"v"]
    p.append("m", "w")
    assert p.get("m") == b"vw"
    with pytest.raises(DistStoreError, match="'pre/never'"):
        p.wait(["never"], timedelta(milliseconds=200))


def test_torch_barrier_without_rank(server):
    stores = [server.client(timeout=10) for _ in range(2)]
    with ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(s.barrier, "tb", 2, timedelta(seconds=10)) for s in stores]
        for f in futs:
            f.result(timeout=20)
    for s in stores:
        s.close()


# -- timeouts ---------------------------------------------------------------


def test_get_timeout_names_key(store):
    store.set_timeout(timedelta(milliseconds=300))
    t0 = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="'missing-key'") as ei:
        store.get("missing-key")
    assert 0.25 < time.monotonic() - t0 < 3
    assert isinstance(ei.value, TimeoutError)
    assert isinstance(ei.value, DistStoreError)  # torch's retry loops catch RuntimeError
    store.set("missing-key", b"now")  # still usable; the cancelled get left nothing behind
    assert store.get("missing-key") == b"now"


def test_wait_timeout_names_missing_keys(store):
    store.set("here", b"1")
    with pytest.raises(TimeoutError) as ei:
        store.wait(["here", "gone-1", "gone-2"], timedelta(milliseconds=200))
    msg = str(ei.value)
    assert "2 of 3 keys missing" in msg and "'gone-1'" in msg and "'gone-2'" in msg
    with pytest.raises(TimeoutError, match="'m-gone'"):
        store.set_timeout(0.2)
        store.multi_get(["here", "m-gone"])


def test_parked_get_woken_by_set_and_zero_means_no_limit(server, store):
    other = server.client()
    waiter = threading.get_native_id()

    def later():
        wait_until_in_poll(waiter)  # parked in the server
        time.sleep(0.3)  # and stays parked: it has no time limit
        other.set("late", b"v")

    t0 = time.monotonic()
    th = threading.Thread(target=later)
    th.start()
    store.wait(["late"], timedelta(0))  # timedelta(0): no limit, as in torch
    assert store.get("late") == b"v"
    assert 0.2 < time.monotonic() - t0 < 5
    th.join(5)
    other.close()


def test_gil_released_while_blocked(store):
    done = threading.Event()
    ticks = []

    def blocked():
        try:
            store.get("never-set-gil")
        except TimeoutError:
            pass
        done.set()

    store.set_timeout(timedelta(seconds=1))
    th = threading.Thread(target=blocked)
    th.start()
    while not done.is_set():
        ticks.append(1)  # would stall if the blocked call held the GIL
        time.sleep(0.01)
    th.join(5)
    assert len(ticks) > 20


def test_close_and_shutdown_wake_blocked_calls(server):
    s = server.client(timeout=30)
    errs = []

    def blocked(st):
        try:
            st.get("never")
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    th = threading.Thread(target=blocked, args=(s,))
    th.start()
    wait_until_in_poll(th.native_id)
    s.close()
    th.join(5)
    assert not th.is_alive() and isinstance(errs[0], ConnectionError)

    s2 = server.client(timeout=30)
    th = threading.Thread(target=blocked, args=(s2,))
    th.start()
    wait_until_in_poll(th.native_id)
    server.shutdown()
    th.join(5)
    assert not th.is_alive() and isinstance(errs[1], ConnectionError)
    assert "closed the connection" in str(errs[1])


def test_signal_interrupts_blocked_get(store):
    store.set_timeout(timedelta(seconds=20))
    waiter = threading.get_native_id()

    def interrupt():
        wait_until_in_poll(waiter)
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=interrupt)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        store.get("never-sigint")
    assert time.monotonic() - t0 < 5
    timer.join()
    store.set("after", b"1")  # the interrupted request was cancelled cleanly
    assert store.get("after") == b"1"


# -- auth, malformed input, connection storms ---------------------------------


def test_wrong_token(server, store):
    t0 = time.monotonic()
    with pytest.raises(PermissionError, match="wrong token"):
        Store(server.host, server.port, "not-the-token", timeout=5)
    assert time.monotonic() - t0 < 3
    assert store.add("still-fine", 1) == 1


def test_malformed_frames_from_raw_socket(server, store):
    cases = [
        (None, b"GET / HTTP/1.1\r\n\r\n"),  # not our protocol at all
        (None, struct.pack("<I", 0xFFFFFFF0) + b"\0" * 12),  # absurd length, pre-auth
        (None, frame(OP_GET, b"k")),  # a request before HELLO
        (server.token, struct.pack("<I", 0xFFFFFFF0) + b"\0" * 12),  # absurd length
        (server.token, struct.pack("<I", 2) + b"\0\0"),  # shorter than a header
        (server.token, frame(77)),  # unknown op
        (server.token, frame(OP_GET, b"a", b"b")),  # wrong argument count
        (server.token, frame(OP_HELLO, MAGIC, server.token.encode())),  # HELLO twice
        (server.token, frame(OP_SET, b"k", b"v")[:-1] + b""),  # then disconnect mid-frame
    ]
    for token, payload in cases[:-1]:
        sock = raw(server, token)
        sock.sendall(payload)
        assert closed_by_server(sock), payload
        sock.close()
        assert store.add("alive", 1) > 0
    # A frame whose argument runs past its end.
    sock = raw(server, server.token)
    bad = bytearray(frame(OP_SET, b"key", b"value"))
    bad[12:16] = struct.pack("<I", 999)
    sock.sendall(bytes(bad))
    assert closed_by_server(sock)
    sock.close()
    # Disconnecting mid-request stores nothing.
    clients = server.num_clients
    sock = raw(server, server.token)
    sock.sendall(cases[-1][1])
    sock.close()
    deadline = time.monotonic() + 5
    while server.num_clients > clients:  # the server has read it all and dropped it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not store.check(["k", "key"])
    # A connection that never authenticates is dropped after auth_timeout.
    sock = raw(server)
    assert closed_by_server(sock, within=5)
    sock.close()
    assert server.running and store.add("alive", 1) == len(cases)


def test_connect_storm(server):
    n = 200

    def one(_):
        s = Store(server.host, server.port, server.token, timeout=20)
        s.add("storm", 1)
        return s

    with ThreadPoolExecutor(50) as ex:
        stores = list(ex.map(one, range(n), timeout=60))
    assert server.num_clients == n
    assert stores[0].get("storm") == str(n).encode()
    for s in stores:
        s.close()
    del stores
    deadline = time.monotonic() + 5
    while server.num_clients and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.num_clients == 0


def test_concurrent_adds_from_threads(server):
    stores = [server.client() for _ in range(8)]

    def work(s):
        for _ in range(200):
            s.add("c", 1)

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(work, stores, timeout=60))
    assert stores[0].get("c") == b"1600"
    for s in stores:
        s.close()


# -- bad inputs -------------------------------------------------------------


def test_bad_inputs(store):
    with pytest.raises(ValueError, match="4096"):
        store.set("k" * 4097, b"v")
    with pytest.raises(TypeError, match="key must be str or bytes"):
        store.set(5, b"v")
    with pytest.raises(TypeError, match="value must be bytes or str"):
        store.set("k", 5)
    with pytest.raises(ValueError, match="NUL"):
        store.set("a\0b", b"v")
    with pytest.raises(TypeError, match="list"):
        store.wait("single-key")
    with pytest.raises(ValueError, match=">= 0"):
        store.wait(["k"], timedelta(seconds=-1))
    with pytest.raises(ValueError, match=">= 0"):
        store.set_timeout(-1)
    with pytest.raises(TypeError, match="timedelta"):
        store.wait(["k"], "soon")
    with pytest.raises(TypeError, match="int"):
        store.add("n", 1.5)
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        store.multi_set(["a", "b"], [b"1"])
    with pytest.raises(ValueError, match="at most 1024"):
        store.wait(["k"] * 1025)
    assert store.check(["nope"] * 1025) is False  # check batches larger lists
    store.set("text", b"abc")
    with pytest.raises(ValueError, match="not a decimal integer"):
        store.add("text", 1)
    assert store.add("fine", 1) == 1  # errors above did not break the connection


def test_value_limit(server):
    with StoreServer(max_value_size=1024) as small:
        s = small.client(timeout=5)
        s.set("ok", b"x" * 1024)
        with pytest.raises(ValueError, match="exceeds the store's limit of 1024"):
            s.set("big", b"x" * 1025)
        with pytest.raises(ValueError, match="over the limit"):
            s.append("ok", b"y")
        assert s.get("ok") == b"x" * 1024
        s.close()


def test_connect_refused_times_out_with_address():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens on it
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        Store("127.0.0.1", port, "tok", connect_timeout=0.3)
    assert time.monotonic() - t0 < 3
    with pytest.raises(ValueError, match="token"):
        Store("127.0.0.1", port, "")


# -- environment, pickling, unix sockets --------------------------------------


def test_from_env(server, monkeypatch):
    monkeypatch.delenv("FASTSPAWN_STORE_ADDR", raising=False)
    monkeypatch.delenv("FASTSPAWN_STORE_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="FASTSPAWN_STORE_ADDR and FASTSPAWN_STORE_TOKEN"):
        Store.from_env()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FASTSPAWN_STORE_TIMEOUT", "12.5")
    s = Store.from_env()
    assert s.timeout == timedelta(seconds=12.5)
    s.set("env", b"1")
    s.close()
    assert parse_addr("[::1]:29500") == ("::1", 29500)
    assert parse_addr("node-3:80") == ("node-3", 80)
    assert parse_addr("unix:@x") == ("unix:@x", 0)
    with pytest.raises(ValueError, match="host:port"):
        parse_addr("no-port")


def test_pickle_reconnects(store):
    store.set("p", b"1")
    copy = pickle.loads(pickle.dumps(store))
    assert copy is not store and copy.get("p") == b"1"
    copy.close()


def test_unix_socket(no_leaks):
    with StoreServer(unix_path="@") as srv:
        assert srv.unix_path.startswith("@fastspawn-store-")
        s = srv.client(prefer_unix=True, timeout=5)
        s.set("u", b"1")
        t = srv.client(timeout=5)  # TCP sees the same keys
        assert t.get("u") == b"1"
        assert srv.env(prefer_unix=True)["FASTSPAWN_STORE_ADDR"] == "unix:" + srv.unix_path
        s.close()
        t.close()
        del s, t


def test_server_leaves_no_fds(no_leaks):
    srv = StoreServer()
    stores = [srv.client(timeout=5) for _ in range(5)]
    for s in stores:
        s.add("x", 1)
        s.close()
    del stores
    srv.shutdown()
    srv.shutdown()  # idempotent
    assert not srv.running


def test_token_is_random_hex(server):
    assert len(server.token) == 64 and int(server.token, 16) >= 0
    assert _C.store_make_token() != _C.store_make_token()


# -- barrier ----------------------------------------------------------------


def test_barrier_passes_and_timeout_names_missing_ranks(server):
    world = 4
    stores = [server.client(timeout=10) for _ in range(world)]
    with ThreadPoolExecutor(world) as ex:
        futs = [ex.submit(stores[r].barrier, "ok", world, 10, rank=r) for r in range(world)]
        for f in futs:
            f.result(timeout=20)
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(stores[r].barrier, "partial", world, 0.3, rank=r) for r in (0, 2)]
        errs = [f.exception(timeout=20) for f in futs]
    assert time.monotonic() - t0 < 5
    for e in errs:
        assert isinstance(e, StoreTimeoutError)
        assert "2 of 4 ranks arrived; missing ranks: 1, 3" in str(e)
    for s in stores:
        s.close()


# -- torch.distributed rendezvous through the store, 2 processes --------------


def _pg_rank(rank, world, env, init_barrier, q):
    try:
        os.environ.update(env)
        if init_barrier:
            os.environ["TORCH_DIST_INIT_BARRIER"] = "1"
        store = Store.from_env(timeout=timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=30))
        t = torch.full((4,), float(rank + 1))
        dist.all_reduce(t)
        dist.barrier()
        dist.destroy_process_group()
        q.put((rank, t.tolist()))
    except BaseException as e:
        q.put((rank, repr(e)))
        raise


@pytest.mark.parametrize("init_barrier", [False, True])
def test_init_process_group_gloo(server, init_barrier):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_pg_rank, args=(r, 2, server.env(), init_barrier, q))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(q.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    assert results == {0: [3.0] * 4, 1: [3.0] * 4}
    assert [p.exitcode for p in procs] == [0, 0]


def _use_parent_client(store, q):
    try:
        store.get("x")
        q.put("no error")
    except ValueError as e:
        q.put(str(e))


def test_forked_child_cannot_use_parent_connection(store):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_use_parent_client, args=(store, q))
    p.start()
    msg = q.get(timeout=30)
    p.join(30)
    assert "after fork" in msg
    store.set("x", b"1")  # the parent's connection is untouched
    assert store.get("x") == b"1"


def test_store_survives_dropping_the_python_object(server):
    # torch keeps only the C++ half (PrefixStore, NCCL's lazy set-up): a
    # temporary Store must keep working after the last Python reference goes.
    import gc
    prefixed = dist.PrefixStore("x", server.client())
    gc.collect()
    prefixed.set("k", "v")
    assert prefixed.get("k") == b"v"
