"""Rendezvous: where this launcher sits in the job, the stores it hosts, and the
one call that gives a rank its process group.

One launcher runs per node. Node 0's launcher hosts fastspawn's C store (a C
thread in the launcher; on one machine bound to 127.0.0.1 port 0, so two jobs
never clash) and a torch ``TCPStore`` for scripts that rendezvous with
``init_method="env://"`` (also on port 0; ranks reach it as torchrun's agent
store, ``TORCHELASTIC_USE_AGENT_STORE=True``, so no rank binds a port). Both
outlive any rank and stop when the launcher's join ends.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import secrets
import socket
from typing import Dict, List, Mapping, Optional

ENV_IN_RANK = "FASTSPAWN_IN_RANK"
#: The shared secret of a multi-node job (every launcher must see the same value).
ENV_JOB_TOKEN = "FASTSPAWN_JOB_TOKEN"
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


def _int_env(env: Mapping[str, str], name: str) -> Optional[int]:
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


def detect_placement(nnodes: Optional[int] = None, node_rank: Optional[int] = None,
                     master_addr: Optional[str] = None, master_port: Optional[int] = None,
                     env: Optional[Mapping[str, str]] = None) -> Placement:
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


def job_token(placement: Placement, token: Optional[str]) -> str:
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
    """The launcher's side: stores (node 0), node registration, rank environments."""

    def __init__(self, nprocs: int, placement: Placement, token: Optional[str] = None,
                 timeout: Optional[float] = None):
        from . import store as _store

        self.nprocs = nprocs
        self.placement = placement
        self.timeout = timeout if timeout is not None else float(
            os.environ.get(ENV_RDZV_TIMEOUT, DEFAULT_RDZV_TIMEOUT))
        self.token = job_token(placement, token)
        self.server = None
        self.torch_store = None
        if placement.node_rank == 0:
            bind = "127.0.0.1" if not placement.multi_node else ""
            # One machine: also an abstract Unix socket (measured ~40% faster
            # round trips than TCP loopback), which the ranks use.
            self.server = _store.StoreServer(bind, placement.master_port, self.token,
                                             unix_path=None if placement.multi_node else "@")
            import torch.distributed as dist

            self.torch_store = dist.TCPStore(bind or "0.0.0.0", 0, None, True,
                                             wait_for_workers=False)
        self.store_host = "127.0.0.1" if not placement.multi_node else placement.master_addr
        self.store_port = self.server.port if self.server else placement.master_port
        self.torch_port = self.torch_store.port if self.torch_store else None
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
            if self.torch_store is not None:
                client.set("fastspawn/torch_store_port", str(self.torch_port))
            keys = [f"fastspawn/node/{r}" for r in range(p.nnodes)]
            try:
                client.wait(keys, datetime.timedelta(seconds=self.timeout))
            except TimeoutError:
                missing = [r for r in range(p.nnodes)
                           if not client.check([f"fastspawn/node/{r}"])]
                raise TimeoutError(f"node {p.node_rank}: nodes {missing} did not check in "
                                   f"within {self.timeout:g} s") from None
            sizes = [int(v.split()[0]) for v in (x.decode() for x in client.multi_get(keys))]
            if self.torch_store is None:
                self.torch_port = int(client.get("fastspawn/torch_store_port"))
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

    def rank_environment(self, local_rank: int) -> Dict[str, str]:
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
            "MASTER_PORT": str(self.torch_port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "FASTSPAWN_STORE_ADDR": self.store_addr,
            "FASTSPAWN_STORE_TOKEN": self.token,
            ENV_IN_RANK: "1",
        }

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.torch_store = None


# ------------------------------------------------------------------ rank side


def default_backend() -> str:
    """fastspawn's shared-memory backend on a machine without CUDA (gloo where it
    is not registered); with CUDA, NCCL for CUDA tensors and gloo for CPU ones.

    The fastspawn backend is a Python ProcessGroup, and torch hands such a group
    every tensor whatever the device map says, so it cannot share a group with
    NCCL yet; it becomes the CPU half there once it is a per-device Backend.
    """
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        return "cpu:gloo,cuda:nccl"
    return "fastspawn" if "fastspawn" in getattr(dist.Backend, "backend_list", []) else "gloo"


def _uses_cuda(backend: str) -> bool:
    return any(word in backend.lower() for word in ("nccl", "cuda", "xccl"))


def init_process_group(backend: Optional[str] = None,
                       timeout: Optional[datetime.timedelta] = None, **kwargs):
    """Create the default process group inside a rank started by fastspawn.

    Rank, world size and store come from the launcher. ``backend`` defaults to
    :func:`default_backend`. When the backend drives CUDA (NCCL), the rank's
    device is set to ``LOCAL_RANK`` (modulo the device count) first. Other keyword arguments go
    to ``torch.distributed.init_process_group``.
    """
    import torch
    import torch.distributed as dist

    from . import store as _store

    if not os.environ.get(_store.ENV_ADDR):
        raise RuntimeError(
            "fastspawn.init_process_group() needs a rank started by fastspawn.spawn (which "
            f"sets {_store.ENV_ADDR}, RANK and WORLD_SIZE); elsewhere call "
            "torch.distributed.init_process_group yourself")
    for name in ("store", "rank", "world_size", "init_method"):
        if name in kwargs:
            raise TypeError(f"init_process_group() got {name}=: fastspawn provides it")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = backend or default_backend()
    # Only a group that drives GPUs touches CUDA: creating a CUDA context costs
    # hundreds of milliseconds that a CPU-only group must not pay.
    if _uses_cuda(backend) and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    store = _store.Store.from_env(timeout)
    dist.init_process_group(backend, store=store, rank=rank,
                            world_size=world, **({"timeout": timeout} if timeout else {}),
                            **kwargs)
    return dist.group.WORLD


__all__: List[str] = ["Placement", "detect_placement", "Rendezvous", "init_process_group",
                      "default_backend", "first_slurm_host"]
