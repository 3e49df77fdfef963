"""Rendezvous: where this launcher sits in the job, the store it hosts, and how
a rank's ``init_process_group`` finds it.

One launcher runs per node. Node 0's launcher hosts fastspawn's C store (a C
thread in the launcher; on one machine bound to 127.0.0.1 port 0 and an
abstract Unix socket, so two jobs never clash; every connection presents the
job's token). Ranks get ``MASTER_ADDR``/``MASTER_PORT`` naming that store.

Inside a rank every ``init_method`` keeps torch's meaning:

- ``env://`` (torch's default): while ``MASTER_ADDR``/``MASTER_PORT`` still
  name the launcher's store, the rendezvous goes through it (no rank binds a
  port); once the rank's code points them elsewhere, torch's own handler runs
  unchanged (rank 0 hosts a TCPStore at that port, as under
  ``torch.multiprocessing.spawn``).
- ``tcp://host:port``, ``file://path`` and ``store=``: torch's own code, untouched.

The env:// redirection wraps torch's registered ``env`` handler
(:func:`install_rank_rendezvous`); each rendezvous through the launcher's store
gets a key prefix of its own, so a second group after ``destroy_process_group()``
never reads the first one's keys.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

if TYPE_CHECKING:  # torch is imported where it is used (a launcher may not need it)
    import torch.distributed as dist

#: The variables a rank starts with: name -> value, None to remove the launcher's.
RankEnv = dict[str, str | None]

ENV_IN_RANK = "FASTSPAWN_IN_RANK"
#: "host:port" of the launcher's store as MASTER_ADDR/MASTER_PORT name it in a rank:
#: env:// goes through the launcher's store while they still say this.
ENV_MASTER = "FASTSPAWN_MASTER"
_ENV_STORE_ADDR = "FASTSPAWN_STORE_ADDR"  # fastspawn.store.ENV_ADDR (store imports torch)
#: The shared secret of a multi-node job (every launcher must see the same value).
ENV_JOB_TOKEN = "FASTSPAWN_JOB_TOKEN"
#: Node 0's store address to bind on a multi-node job (default: every interface).
ENV_STORE_BIND = "FASTSPAWN_STORE_BIND"
#: How long launchers wait for each other (seconds).
ENV_RDZV_TIMEOUT = "FASTSPAWN_RDZV_TIMEOUT"
DEFAULT_RDZV_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class Placement:
    """This launcher's place: node ``node_rank`` of ``nnodes``."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int  # 0: pick a free one (single node only)
    source: str  # where the numbers came from, for error messages

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,07],cpu1" -> "gpu03"."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_placement(nnodes: int | None = None, node_rank: int | None = None,
                     master_addr: str | None = None, master_port: int | None = None,
                     env: Mapping[str, str] | None = None) -> Placement:
    """Explicit arguments first, then SLURM, OpenMPI, PMI, torchrun, else one node.

    Inside a rank started by fastspawn, cluster variables are ignored: a nested
    spawn is a local job.
    """
    env = os.environ if env is None else env
    source = "arguments"
    found_nnodes = found_rank = None
    found_addr = env.get("MASTER_ADDR") or None
    found_port = _int_env(env, "MASTER_PORT")
    if env.get(ENV_IN_RANK):
        found_addr, found_port = None, None
    elif _int_env(env, "SLURM_PROCID") is not None and _int_env(env, "SLURM_NNODES"):
        source = "SLURM"
        found_nnodes = _int_env(env, "SLURM_NNODES")
        found_rank = _int_env(env, "SLURM_NODEID")
        ntasks = _int_env(env, "SLURM_NTASKS") or found_nnodes
        if ntasks != found_nnodes:
            raise ValueError(
                f"SLURM started {ntasks} tasks on {found_nnodes} nodes; fastspawn wants one "
                "launcher per node: use `srun --ntasks-per-node=1 python train.py` and let "
                "fastspawn start the ranks of each node")
        if found_addr is None and env.get("SLURM_JOB_NODELIST"):
            found_addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
    elif _int_env(env, "OMPI_COMM_WORLD_SIZE") is not None:
        source = "OpenMPI"
        found_nnodes = _int_env(env, "OMPI_COMM_WORLD_SIZE")
        found_rank = _int_env(env, "OMPI_COMM_WORLD_RANK")
    elif _int_env(env, "PMI_SIZE") is not None:
        source = "PMI"
        found_nnodes = _int_env(env, "PMI_SIZE")
        found_rank = _int_env(env, "PMI_RANK")
    elif _int_env(env, "GROUP_RANK") is not None and env.get("TORCHELASTIC_RUN_ID"):
        source = "torchrun"
        world, local = _int_env(env, "WORLD_SIZE"), _int_env(env, "LOCAL_WORLD_SIZE")
        if local != 1:
            raise ValueError("under torchrun, start one fastspawn launcher per node: "
                             "`torchrun --nproc-per-node=1 ...`")
        found_nnodes, found_rank = world, _int_env(env, "GROUP_RANK")
        if found_port is not None:
            # torchrun's own store holds MASTER_PORT; fastspawn's takes the next one.
            found_port += 1
    nnodes = nnodes if nnodes is not None else (found_nnodes or 1)
    node_rank = node_rank if node_rank is not None else (found_rank or 0)
    if nnodes == 1:
        # MASTER_ADDR/MASTER_PORT in the environment say where rank 0 would host
        # torch's store; one machine needs no agreed port, so fastspawn's store
        # takes a free one (two jobs never clash). Only arguments pin it.
        found_addr, found_port = None, None
    master_addr = master_addr if master_addr is not None else found_addr
    master_port = master_port if master_port is not None else found_port
    for name, value in (("nnodes", nnodes), ("node_rank", node_rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if nnodes < 1:
        raise ValueError(f"nnodes must be at least 1, got {nnodes} (from {source})")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank {node_rank} is out of range for nnodes={nnodes} "
                         f"(from {source}): it must be in 0..{nnodes - 1}")
    if nnodes > 1:
        if not master_addr:
            raise ValueError(f"a {nnodes}-node job needs master_addr (the host of node 0), "
                             "from the argument or MASTER_ADDR")
        if not master_port:
            raise ValueError(f"a {nnodes}-node job needs master_port (a port every node can "
                             "reach on node 0), from the argument or MASTER_PORT")
    if master_port is not None and not 0 <= int(master_port) < 65536:
        raise ValueError(f"master_port must be in 0..65535, got {master_port}")
    return Placement(nnodes, node_rank, master_addr or "127.0.0.1", int(master_port or 0),
                     source)


def job_token(placement: Placement, token: str | None) -> str:
    """The store's token: random for one node; shared by every launcher for several."""
    token = token or os.environ.get(ENV_JOB_TOKEN)
    if token:
        return token
    if placement.multi_node:
        raise ValueError(
            f"a multi-node job needs a shared secret for its store: set {ENV_JOB_TOKEN} to the "
            f"same random value for every launcher (e.g. `export {ENV_JOB_TOKEN}=$(openssl rand "
            "-hex 16)` before srun), or pass store_token=...")
    return secrets.token_hex(16)


class Rendezvous:
    """The launcher's side: the store (node 0), node registration, rank environments."""

    def __init__(self, nprocs: int, placement: Placement, token: str | None = None,
                 timeout: float | None = None):
        from . import store as _store

        self.nprocs = nprocs
        self.placement = placement
        self.timeout = timeout if timeout is not None else float(
            os.environ.get(ENV_RDZV_TIMEOUT, DEFAULT_RDZV_TIMEOUT))
        self.token = job_token(placement, token)
        self.server = None
        if placement.node_rank == 0:
            # One machine: loopback only. Several: every interface, unless
            # FASTSPAWN_STORE_BIND names the one the other nodes reach it on.
            bind = "127.0.0.1" if not placement.multi_node else os.environ.get(ENV_STORE_BIND, "")
            # One machine: also an abstract Unix socket (measured ~40% faster
            # round trips than TCP loopback), which the ranks use.
            self.server = _store.StoreServer(bind, placement.master_port, self.token,
                                             unix_path=None if placement.multi_node else "@")
        self.store_host = "127.0.0.1" if not placement.multi_node else placement.master_addr
        self.store_port = self.server.port if self.server else placement.master_port
        try:
            if placement.multi_node:
                self._register_node()
        except BaseException:
            self.close()
            raise

    def _register_node(self) -> None:
        """Check in with node 0's store; check that every node agrees on the job."""
        from . import store as _store

        p = self.placement
        try:
            client = _store.Store(self.store_host, self.store_port, self.token,
                                  datetime.timedelta(seconds=self.timeout),
                                  connect_timeout=self.timeout)
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise ConnectionError(
                f"node {p.node_rank}: cannot reach node 0's fastspawn store at "
                f"{self.store_host}:{self.store_port} ({exc}); is node 0's launcher running, "
                "and are master_addr/master_port right?") from exc
        try:
            me = f"{self.nprocs} {socket.gethostname()} {os.getpid()}"
            got = client.compare_set(f"fastspawn/node/{p.node_rank}", "", me).decode()
            if got != me:
                raise ValueError(f"node_rank {p.node_rank} registered twice: already taken by "
                                 f"the launcher on {got.split()[1]} (pid {got.split()[2]}); "
                                 "every launcher needs its own node_rank")
            agreed = client.compare_set("fastspawn/nnodes", "", str(p.nnodes)).decode()
            if agreed != str(p.nnodes):
                raise ValueError(f"launchers disagree on the number of nodes: this one says "
                                 f"nnodes={p.nnodes}, another said {agreed}")
            keys = [f"fastspawn/node/{r}" for r in range(p.nnodes)]
            try:
                client.wait(keys, datetime.timedelta(seconds=self.timeout))
            except TimeoutError:
                missing = [r for r in range(p.nnodes)
                           if not client.check([f"fastspawn/node/{r}"])]
                raise TimeoutError(f"node {p.node_rank}: nodes {missing} did not check in "
                                   f"within {self.timeout:g} s") from None
            sizes = [int(v.split()[0]) for v in (x.decode() for x in client.multi_get(keys))]
            # Node 0 keeps its store up until every node has read what it needs,
            # so each node reports the same verdict rather than a lost connection.
            client.set(f"fastspawn/checked/{p.node_rank}", "1")
            if p.node_rank == 0:
                try:
                    client.wait([f"fastspawn/checked/{r}" for r in range(p.nnodes)],
                                datetime.timedelta(seconds=min(self.timeout, 30.0)))
                except TimeoutError:
                    pass  # a node died after checking in; its ranks never start
            if len(set(sizes)) != 1:
                per_node = ", ".join(f"node {r}: {n}" for r, n in enumerate(sizes))
                raise ValueError(f"every node must start the same number of ranks (nprocs); "
                                 f"got {per_node}")
        finally:
            client.close()

    @property
    def store_addr(self) -> str:
        """The address ranks connect to (FASTSPAWN_STORE_ADDR)."""
        if self.server is not None and self.server.unix_addr:
            return self.server.unix_addr
        return f"{self.store_host}:{self.store_port}"

    def rank_environment(self, local_rank: int) -> RankEnv:
        """The variables a rank starts with (None: remove the launcher's value)."""
        p = self.placement
        world = p.nnodes * self.nprocs
        return {
            "RANK": str(p.node_rank * self.nprocs + local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(self.nprocs),
            "GROUP_RANK": str(p.node_rank),
            "NODE_RANK": str(p.node_rank),
            "NNODES": str(p.nnodes),
            "MASTER_ADDR": self.store_host,
            "MASTER_PORT": str(self.store_port),
            # Under torchrun the launcher has this; in a rank it would turn rank 0 of
            # a user's own tcp:// store into a client of a server nobody starts.
            "TORCHELASTIC_USE_AGENT_STORE": None,
            ENV_MASTER: f"{self.store_host}:{self.store_port}",
            _ENV_STORE_ADDR: self.store_addr,
            "FASTSPAWN_STORE_TOKEN": self.token,
            ENV_IN_RANK: "1",
        }

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


# ------------------------------------------------------------------ rank side


def default_backend() -> str:
    """"fastspawn": one group for CPU tensors (shared memory) and CUDA tensors (NCCL,
    through fastspawn's C layer). Where it is not registered: gloo, with NCCL for CUDA
    tensors where CUDA is present."""
    import torch
    import torch.distributed as dist

    if "fastspawn" in getattr(dist.Backend, "backend_list", []):
        return "fastspawn"
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _uses_cuda(backend: str) -> bool:
    return any(word in backend.lower() for word in ("nccl", "cuda", "xccl"))


def set_rank_device(backend: str) -> None:
    """Make LOCAL_RANK (modulo the device count) this rank's CUDA device, for a group
    that may drive GPUs. NCCL backends: now (torch's NCCL expects it). fastspawn's
    group: when CUDA initialises (torch.cuda's queued calls), so a rank that never
    touches a GPU pays no CUDA context; the first CUDA tensor, current_device() or
    set_device() finds it set. Other backends: nothing."""
    import torch

    fastspawn = "fastspawn" in backend.lower()
    if not (_uses_cuda(backend) or fastspawn) or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    if count <= 0:
        return
    device = int(os.environ.get("LOCAL_RANK", "0")) % count
    lazy_call = getattr(torch.cuda, "_lazy_call", None)  # torch 2.1 .. 2.13 at least
    if fastspawn and not _uses_cuda(backend) and lazy_call is not None \
            and not torch.cuda.is_initialized():
        lazy_call(lambda: torch.cuda.set_device(device))
    else:
        torch.cuda.set_device(device)


_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Rendezvous through the launcher's store so far in this rank; each gets its own
#: key prefix. Every rank creates its groups in the same order (torch relies on
#: that too), so the n-th rendezvous of every rank meets under the same prefix.
_rendezvous_count = itertools.count()
_log = logging.getLogger(__name__)


def launcher_store(timeout: datetime.timedelta | None = None) -> dist.PrefixStore:
    """A fresh key space on the launcher's store, for one rendezvous of this rank."""
    import torch.distributed as dist

    from . import store as _store

    base = _store.Store.from_env(timeout)
    return dist.PrefixStore(f"fastspawn/rdzv/{next(_rendezvous_count)}/", base)


def _env_names_launcher_store(env: Mapping[str, str]) -> bool:
    """Whether MASTER_ADDR/MASTER_PORT still name the launcher's store."""
    master = env.get(ENV_MASTER)
    if not master or not env.get(_ENV_STORE_ADDR):
        return False
    host, _, port = master.rpartition(":")
    addr = env.get("MASTER_ADDR", "")
    if env.get("MASTER_PORT", "").strip() != port:
        return False
    return addr == host or (host == "127.0.0.1" and addr in _LOOPBACK_NAMES)


def _env_int(query: dict[str, list[str]], key: str, var: str) -> int:
    if key in query:
        return int(query[key][0])
    value = os.environ.get(var)
    if not value:
        raise ValueError(f"env:// rendezvous: environment variable {var} expected, but not set")
    return int(value)


def _wrap_env_handler(torch_handler: Any) -> Any:
    def env_handler(url: str, **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
        # A generator: torch runs this body at init time, so the check sees the
        # environment as the rank's code left it.
        if not _env_names_launcher_store(os.environ):
            return (yield from torch_handler(url, **kwargs))
        query = parse_qs(urlparse(url).query)
        rank = _env_int(query, "rank", "RANK")
        world_size = _env_int(query, "world_size", "WORLD_SIZE")
        yield launcher_store(kwargs.get("timeout")), rank, world_size
        raise RuntimeError("Unable to perform re-rendezvous using env:// method")

    env_handler.fastspawn_wraps = torch_handler  # type: ignore[attr-defined]
    return env_handler


def _wrap_file_handler(torch_handler: Any) -> Any:
    def file_handler(url: str, **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
        # torch's FileStore retries open() while it fails with ENOENT (waiting for
        # a file another node creates), so a path whose directory does not exist
        # is a silent wait until the timeout (30 min by default). Say so at once.
        path = urlparse(url).path
        folder = os.path.dirname(path) or "."
        if path and not os.path.isdir(folder):
            raise _store_error(
                f"file:// rendezvous: cannot create {path}: the directory {folder} does not "
                "exist (torch's FileStore would wait for it until the timeout); create it or "
                "choose a path every rank can write")
        return (yield from torch_handler(url, **kwargs))

    file_handler.fastspawn_wraps = torch_handler  # type: ignore[attr-defined]
    return file_handler


def _store_error(msg: str) -> Exception:
    import torch.distributed as dist

    return getattr(dist, "DistStoreError", RuntimeError)(msg)


def install_rank_rendezvous() -> bool:
    """In a new rank: route env:// through the launcher's store (see the module doc).

    torch offers no public way to replace a registered rendezvous handler, so
    this wraps the entry in ``torch.distributed.rendezvous._rendezvous_handlers``
    (present from torch 1.x through 2.13; a test checks it on every torch the
    suite runs on). Returns False, with a warning, where it is missing.
    """
    global _rendezvous_count
    _rendezvous_count = itertools.count()
    import importlib

    # The module, not torch.distributed.rendezvous (the function of that name).
    _torch_rdzv = importlib.import_module("torch.distributed.rendezvous")
    handlers = getattr(_torch_rdzv, "_rendezvous_handlers", None)
    if not isinstance(handlers, dict) or "env" not in handlers:
        _log.warning("fastspawn: this torch has no env:// handler registry; env:// inside a "
                     "rank needs MASTER_ADDR/MASTER_PORT of your own (rank 0 hosts there)")
        return False
    for scheme, wrap in (("env", _wrap_env_handler), ("file", _wrap_file_handler)):
        current = handlers.get(scheme)
        if current is not None and getattr(current, "fastspawn_wraps", None) is None:
            handlers[scheme] = wrap(current)  # once (a nested launcher's rank has them)
    return True


def init_process_group(backend: str | None = None,
                       timeout: datetime.timedelta | None = None,
                       **kwargs: Any) -> dist.ProcessGroup | None:
    """Create the default process group inside a rank started by fastspawn.

    Rank, world size and store come from the launcher. ``backend`` defaults to
    :func:`default_backend` ("fastspawn": CPU and CUDA tensors in one group). Where
    CUDA is present the rank's device is ``LOCAL_RANK`` (modulo the device count):
    see :func:`set_rank_device`. Other keyword arguments (``device_id=`` included) go
    to ``torch.distributed.init_process_group``.
    """
    import torch.distributed as dist

    if not os.environ.get(_ENV_STORE_ADDR):
        raise RuntimeError(
            "fastspawn.init_process_group() needs a rank started by fastspawn.spawn (which "
            f"sets {_ENV_STORE_ADDR}, RANK and WORLD_SIZE); elsewhere call "
            "torch.distributed.init_process_group yourself")
    for name in ("store", "rank", "world_size", "init_method"):
        if name in kwargs:
            raise TypeError(f"init_process_group() got {name}=: fastspawn provides it")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = backend or default_backend()
    # Only a group that drives GPUs touches CUDA, and fastspawn's only at its first CUDA
    # use: creating a CUDA context costs hundreds of milliseconds that a CPU-only rank
    # must not pay.
    set_rank_device(backend)
    options: dict[str, Any] = dict(kwargs)
    if timeout:
        options["timeout"] = timeout
    dist.init_process_group(backend, store=launcher_store(timeout), rank=rank,
                            world_size=world, **options)
    return dist.group.WORLD


__all__: list[str] = [
    "Placement",
    "Rendezvous",
    "default_backend",
    "detect_placement",
    "first_slurm_host",
    "init_process_group",
    "install_rank_rendezvous",
    "launcher_store",
    "set_rank_device",
]
