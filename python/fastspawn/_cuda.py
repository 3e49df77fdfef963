"""The CUDA half of the fastspawn process group: collectives on CUDA tensors
through NCCL, driven by fastspawn._C's NCCL layer (csrc/lib/nccl_*.c). This file:
loading, the tensor / stream accessors, works, communicators; _cuda_coll.py: the
collectives themselves (CudaHalf).

ProcessGroupFastspawn (backend.py) hands a call here when its tensors are CUDA
tensors (one attribute test), and keeps CPU tensors on shared memory. One group
thus serves both devices, as ``dist.init_process_group("fastspawn")`` promises.

- Loading: nothing CUDA happens at import. The first CUDA collective loads the
  CUDA runtime and NCCL (``_C.cuda_load`` / ``_C.nccl_load``: the copies torch
  already loaded come first, then torch's bundled ``nvidia/*/lib`` folders,
  then the system's); a failure lists every place searched.
- Communicators: one per (group, device), created at the first collective on
  that device, or eagerly when ``init_process_group(device_id=...)`` asks for
  it (torch then calls ``_get_backend(device).eager_connect_single_device``).
  Rank 0 makes the NCCL unique id and hands it over through the group's store,
  under a generation number (a reused store never hands out an old id). Init
  is non-blocking with the group timeout as its deadline where NCCL has it.
- Streams, as torch's ProcessGroupNCCL: each call passes the caller's current
  stream, on which C records an event that the communicator's stream waits
  for; ``Work.wait()`` makes the caller's current stream wait for the work
  (the host does not block); ``async_op=False`` does that in the same C call.
  Tensors of asynchronous calls are ``record_stream``-ed on the communication
  stream, so the caching allocator does not hand their memory out early.
  ``Work.get_future()`` is CUDA-aware, completed on the communication stream
  (DDP's callbacks run after the NCCL work). ``Work.synchronize()`` and
  barriers block the host, bounded by the group timeout.
- Send / recv are deferred: queued on their communicator with the caller's current
  stream and issued together, as one NCCL group, when something needs them (a
  method of one of their Works, the next other collective, a coalescing block,
  shutdown), so crossing sends never wait for each other (CudaComms.defer).
- Errors: the C layer's (a watchdog timeout names the collective, its
  sequence number and the timeout; a dead peer, NCCL's asynchronous error)
  become torch's DistBackendError; bad input is a TypeError or ValueError
  naming the tensor and what to do.

Test-only switch: with ``FASTSPAWN_TEST_NCCL_ON_CPU=1`` in the environment (read
once, at import), a fastspawn group sends CPU tensors through this NCCL path
too, with host memory as "device" memory: for tests against the fake CUDA
runtime and NCCL of tests/c/fake_cuda/ (FASTSPAWN_CUDART_LIBRARY /
FASTSPAWN_NCCL_LIBRARY point at them) on machines without a GPU. The few tensor
and stream accessors this module needs live in two small adapters
(_CudaTensors, _HostTensors) so that everything else runs the same either way.
Never set it for real work.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as _c10d

from . import _C

#: The test-only switch (see the module docstring).
ENV_TEST_ON_CPU = "FASTSPAWN_TEST_NCCL_ON_CPU"
TEST_ON_CPU = os.environ.get(ENV_TEST_ON_CPU) == "1"

# How long shutdown() waits for outstanding works before it aborts the communicator.
CLOSE_TIMEOUT = 10.0

# torch's DistBackendError (a RuntimeError); torch 2.1 has none and raises RuntimeError.
if TYPE_CHECKING:
    _BackendError: TypeAlias = dist.DistBackendError
else:
    _BackendError = getattr(dist, "DistBackendError", RuntimeError)

_Tensors: TypeAlias = list[torch.Tensor]
# NcclComm.run's positional arguments (kind, dtype, count, send, recv, op, root, stream)
_RunArgs: TypeAlias = tuple[int, int, int, int, int, int, int, int]
# A torch Future (torch.futures.Future of any result)
_Future: TypeAlias = "torch.futures.Future[Any]"

_ALLREDUCE, _BROADCAST, _REDUCE = _C.COLL_ALLREDUCE, _C.COLL_BROADCAST, _C.COLL_REDUCE
_ALLGATHER, _REDUCE_SCATTER = _C.COLL_ALLGATHER, _C.COLL_REDUCE_SCATTER
_ALLTOALL, _BARRIER = _C.COLL_ALLTOALL, _C.COLL_BARRIER
_SEND, _RECV, _ALLTOALLV = _C.NCCL_SEND, _C.NCCL_RECV, _C.NCCL_ALLTOALLV
_BYTES = _C.DTYPE_UINT8  # data-moving collectives move bytes: any dtype travels
_PREMUL = _C.NCCL_OP_PREMUL_SUM

# torch dtype -> dtype code, for reductions (NCCL's types; bool travels as uint8).
_DTYPES = {
    torch.float32: _C.DTYPE_FLOAT32, torch.float64: _C.DTYPE_FLOAT64,
    torch.float16: _C.DTYPE_FLOAT16, torch.bfloat16: _C.DTYPE_BFLOAT16,
    torch.int8: _C.DTYPE_INT8, torch.uint8: _C.DTYPE_UINT8, torch.int32: _C.DTYPE_INT32,
    torch.int64: _C.DTYPE_INT64, torch.bool: _C.DTYPE_BOOL,
}
for _name, _code in (("uint32", _C.NCCL_DTYPE_UINT32), ("uint64", _C.NCCL_DTYPE_UINT64),
                     ("float8_e4m3fn", _C.NCCL_DTYPE_FLOAT8_E4M3),
                     ("float8_e5m2", _C.NCCL_DTYPE_FLOAT8_E5M2)):
    if hasattr(torch, _name):  # uint32/64 since torch 2.3, float8 since 2.1
        _DTYPES[getattr(torch, _name)] = _code
_PREMUL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ReduceOp.RedOpType -> op code.
_OPS = {"SUM": _C.OP_SUM, "AVG": _C.OP_AVG, "MIN": _C.OP_MIN, "MAX": _C.OP_MAX,
        "PRODUCT": _C.OP_PRODUCT, "PREMUL_SUM": _PREMUL}
_RED = getattr(dist.ReduceOp, "RedOpType", dist.ReduceOp)
_OP_BY_TYPE = {getattr(_RED, n): c for n, c in _OPS.items() if hasattr(_RED, n)}

# torch 2.1's option structs have no asyncOp: every call is asynchronous there.
_HAS_ASYNC_OP = hasattr(_c10d.AllreduceOptions(), "asyncOp")

#: The ProcessGroup methods this half implements, by their torch names (backend.py
#: dispatches each of them here for CUDA tensors).
COLLECTIVES = (
    "allreduce", "allreduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_single",
    "_reduce_scatter_base", "reduce_scatter_tensor_coalesced", "reduce_scatter_single_coalesced",
    "broadcast", "allgather", "all_gather_single", "_allgather_base",
    "allgather_into_tensor_coalesced", "all_gather_single_coalesced", "gather", "scatter",
    "alltoall", "all_to_all_single", "alltoall_base", "barrier", "send", "recv",
    "recv_anysource", "_start_coalescing", "_end_coalescing",
)


# ---------------------------------------------------------------------------
# Errors and small helpers
# ---------------------------------------------------------------------------

def _wrap(exc: BaseException) -> BaseException:
    """A C error as torch raises it: DistBackendError for failures, ValueError for
    arguments NCCL refused (the communicator stays usable)."""
    if isinstance(exc, _BackendError):
        return exc
    if isinstance(exc, ValueError):
        err: BaseException = ValueError(f"fastspawn: {exc}")
    elif isinstance(exc, (RuntimeError, TimeoutError, ConnectionError)):
        err = _BackendError(f"fastspawn: {exc}")
    else:
        return exc
    err.__cause__ = exc
    return err


def _wait_seconds(timeout: timedelta | float | None) -> float | None:
    """Work.wait's timeout (timedelta or seconds; None, 0 or negative: none) in seconds."""
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    return float(timeout) if timeout is not None and timeout > 0 else None


def _single(tensors: Sequence[Any], what: str) -> Any:
    """The one item of tensors (a collective's list of one tensor, or of one list)."""
    if len(tensors) != 1:
        raise ValueError(f"fastspawn: {what} takes exactly one tensor per rank, got "
                         f"{len(tensors)}")
    return tensors[0]


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its memory without gaps (channels-last counts)."""
    if t.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

_load_lock = threading.Lock()
_loaded = False


def library_dirs() -> list[str]:
    """torch's bundled CUDA libraries: site-packages/nvidia/*/lib (nvidia-nccl-cu13 /
    -cu12: nccl/lib; nvidia-cuda-runtime for CUDA 13: cu13/lib; for CUDA 12:
    cuda_runtime/lib), and torch/lib (builds that carry their own copies)."""
    dirs: list[str] = []
    try:
        import nvidia  # type: ignore[import-untyped]  # (the nvidia-* wheels' namespace package)
        roots = list(getattr(nvidia, "__path__", []))
    except ImportError:
        roots = []
    for root in roots:
        for sub in ("nccl", "cu13", "cuda_runtime", "cu12"):
            d = os.path.join(root, sub, "lib")
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if os.path.isdir(torch_lib):
        dirs.append(torch_lib)
    return dirs


def load() -> None:
    """Load the CUDA runtime and NCCL once per process (the first CUDA collective)."""
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        dirs = library_dirs()
        try:
            _C.cuda_load(dirs)
            _C.nccl_load(dirs)
        except RuntimeError as e:
            raise RuntimeError(
                f"fastspawn: CUDA tensors need the CUDA runtime and NCCL, which could not be "
                f"loaded: {e}") from None
        _loaded = True


# ---------------------------------------------------------------------------
# Tensor and stream accessors: CUDA tensors, or (test only) host memory
# ---------------------------------------------------------------------------

class _CudaTensors:
    """The accessors for real CUDA tensors."""

    host_is_device = False
    # t.get_device(): the CUDA device index (-1 for a CPU tensor)
    device_of = staticmethod(torch.Tensor.get_device)
    # the current stream of a device, as a cudaStream_t (int)
    _raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    stream = staticmethod(_raw if _raw is not None
                          else (lambda dev: torch.cuda.current_stream(dev).cuda_stream))
    del _raw

    @staticmethod
    def on(t: torch.Tensor, dev: int) -> bool:
        return t.is_cuda and t.get_device() == dev

    @staticmethod
    def current_device() -> int:
        return torch.cuda.current_device()

    @staticmethod
    def comm_stream(handle: int, dev: int) -> torch.cuda.ExternalStream | None:
        """The communication stream as torch sees it (record_stream, futures)."""
        return torch.cuda.ExternalStream(handle, device=torch.device("cuda", dev))

    @staticmethod
    def future(dev: int, comm_stream: torch.cuda.ExternalStream | None, result: Any) -> _Future:
        # Completed on the communication stream, as ProcessGroupNCCL does: whoever
        # waits on the future (or runs a callback) is ordered after the NCCL work.
        fut: _Future = torch.futures.Future(devices=[torch.device("cuda", dev)])
        with torch.cuda.stream(comm_stream):
            fut.set_result(result)
        return fut

    @staticmethod
    def name(dev: int) -> str:
        return f"cuda:{dev}"


# What a CUDA collective returns: its Work, or (a synchronous call) the shared done one.
_HalfWork: TypeAlias = "CudaWork | _DoneWork"
# Which accessors a group's CUDA half uses (CudaComms._t).
_Accessors: TypeAlias = "type[_CudaTensors] | type[_HostTensors]"


class _HostTensors:
    """Test only (FASTSPAWN_TEST_NCCL_ON_CPU): CPU tensors are the fake runtime's
    device memory, stream 0 its default stream; the host reads results, so waits
    also block the host and futures complete once the work did."""

    host_is_device = True
    _device: int | None = None

    @classmethod
    def device_of(cls, t: torch.Tensor | None) -> int:
        if cls._device is None:
            load()
            cls._device = int(os.environ.get("LOCAL_RANK", "0")) % _C.cuda_device_count()
        return cls._device

    @staticmethod
    def stream(dev: int) -> int:
        return 0

    @staticmethod
    def on(t: torch.Tensor, dev: int) -> bool:
        return t.device.type == "cpu"

    @classmethod
    def current_device(cls) -> int:
        return cls.device_of(None)

    @staticmethod
    def comm_stream(handle: int, dev: int) -> torch.cuda.ExternalStream | None:
        return None

    @staticmethod
    def future(dev: int, comm_stream: torch.cuda.ExternalStream | None, result: Any) -> _Future:
        fut: _Future = torch.futures.Future()
        fut.set_result(result)
        return fut

    @staticmethod
    def name(dev: int) -> str:
        return f"fake device {dev} (host memory)"


# ---------------------------------------------------------------------------
# Works
# ---------------------------------------------------------------------------

class CudaWork(dist._Work):
    """One NCCL collective (or coalesced group) on the communication stream.

    wait(): the caller's current stream waits for it (the host does not block,
    unless a timeout is given: then the host waits up to that long); synchronize():
    the host waits; get_future(): a CUDA-aware torch Future.

    A deferred send or receive (CudaComms.defer) has no NCCL work yet: every one of
    these methods but exception() first issues what its communicator has queued."""

    def __init__(self, half: CudaComms, comm: _Comm, nwork: _C.NcclWork | None, result: Any,
                 keep: Sequence[torch.Tensor | None] = (), barrier: bool = False) -> None:
        super().__init__()
        self._half = half
        self._comm = comm
        self._nwork = nwork  # _C.NcclWork; None while its coalescing block is open
        self._result = result
        self._keep = keep  # buffers to hold until done (test mode; pending groups)
        self._barrier = barrier
        self._fut: _Future | None = None
        self._exc: BaseException | None = None
        # A deferred send / recv: its run() arguments until the communicator issues it.
        self._p2p: _RunArgs | None = None
        if half._pins is not None:
            half._pin(self)

    def _issue(self) -> None:
        """A deferred send / recv: issue everything its communicator has queued."""
        if self._p2p is not None:
            self._half.issue_deferred(self._comm)

    def _fail(self, e: BaseException) -> BaseException:
        self._exc = exc = _wrap(e)
        return exc

    def _host_wait(self, seconds: float | None) -> None:
        assert self._nwork is not None  # (callers check)
        try:
            self._nwork.synchronize(seconds)
        except TimeoutError as e:
            if self._half._comm_failed(self._comm):
                raise self._fail(e) from None
            raise _BackendError(f"fastspawn: {e}") from None  # the work goes on
        except Exception as e:  # noqa: BLE001 - the collective's own error
            raise self._fail(e) from None
        self._keep = ()

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        """The caller's current stream waits for the work (with a timeout, or in test
        mode, the host too); raises its error."""
        half = self._half
        if half._pins is not None:
            half._unpin(self)
        self._issue()
        if self._exc is not None:
            raise self._exc
        if self._nwork is None:  # inside an open coalescing block: nothing launched yet
            return True
        try:
            self._nwork.wait_stream(half._t.stream(self._comm.dev))
        except Exception as e:  # noqa: BLE001
            raise self._fail(e) from None
        seconds = _wait_seconds(timeout)
        if seconds is not None or self._barrier or half._t.host_is_device:
            # None: until the work's own deadline (the group timeout), where the watchdog
            # fails it with its message
            self._host_wait(seconds)
        return True

    def synchronize(self) -> None:
        """Block the host until the work is done (its deadline: the group timeout)."""
        self._issue()
        if self._nwork is not None:
            self._host_wait(None)
        elif self._exc is not None:  # a deferred send / recv whose issue failed
            raise self._exc

    def is_completed(self) -> bool:
        """Whether the work finished on the device (or failed); does not block."""
        self._issue()
        if self._exc is not None:
            return True
        if self._nwork is None:
            return False
        try:
            done = self._nwork.query()
        except Exception as e:  # noqa: BLE001 - completed, with an error
            self._fail(e)
            return True
        if done:
            self._keep = ()
        return done

    def is_success(self) -> bool:
        """Completed without an error."""
        return self.is_completed() and self._exc is None

    def exception(self) -> BaseException | None:
        """The work's error, once it failed."""
        return self._exc

    def result(self) -> Any:
        """The collective's output tensors."""
        return self._result

    def get_future(self) -> _Future:
        """A CUDA-aware torch Future of result(), completed on the communication stream."""
        half = self._half
        if half._pins is not None:
            half._unpin(self)
        self._issue()  # the future completes on the communication stream: after the work
        if self._fut is None:
            if half._t.host_is_device:
                self.wait()
            if self._exc is not None:
                fut: _Future = torch.futures.Future()
                fut.set_exception(self._exc)
                self._fut = fut
            else:
                self._fut = half._t.future(self._comm.dev, self._comm.ext, self._result)
        return self._fut


class _DoneWork(dist._Work):
    """What synchronous calls return: the caller's stream already waits for the work."""

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self) -> BaseException | None:
        return None

    def result(self) -> _Tensors:
        return []

    def synchronize(self) -> None:
        pass

    def get_future(self) -> _Future:
        fut: _Future = torch.futures.Future()
        fut.set_result([])
        return fut


class _Comm:
    """One NCCL communicator of a group: its device and communication stream."""

    __slots__ = ("deferred", "dev", "ext", "issue_lock", "nccl", "pending")

    def __init__(self, nccl: _C.NcclComm, dev: int, ext: torch.cuda.ExternalStream | None):
        self.nccl = nccl
        self.dev = dev
        self.ext = ext  # the communication stream as a torch stream (None in test mode)
        # Works of an open coalescing block, else None
        self.pending: list[CudaWork] | None = None
        # Sends and receives not issued yet (CudaComms.defer), in call order; the list
        # is emptied only once they are issued, so a collective that sees it non-empty
        # waits for an issue in progress (issue_lock) instead of racing its NCCL group.
        self.deferred: list[CudaWork] = []
        self.issue_lock = threading.Lock()  # guards deferred, held while it is issued


class _DeviceBackend:
    """What ``group._get_backend(torch.device("cuda", i))`` answers, so that
    ``init_process_group(device_id=...)`` creates the communicator eagerly (torch
    2.13 asks ``supports_splitting`` of it and then calls
    ``eager_connect_single_device``). fastspawn's subgroups never split."""

    supports_splitting = True
    supports_coalescing = True

    def __init__(self, half: CudaComms) -> None:
        self._half = half

    def eager_connect_single_device(self, device: torch.device) -> None:
        self._half.connect(self._half._index(device))

    def perform_nocolor_split(self, device: torch.device) -> None:
        pass

    def name(self) -> str:
        return "fastspawn"


# ---------------------------------------------------------------------------
# The CUDA half of a group
# ---------------------------------------------------------------------------

# At most this many Works pinned per group (torch 2.1: see backend._torch_keeps_python_works).
_PIN_CAP = 4096


class CudaComms:
    """The communicators of one fastspawn group's CUDA half, and what its collectives
    (_cuda_coll.CudaHalf) share: works, groups, argument checks."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float,
                 pin_works: bool = False) -> None:
        self._store = store
        self._rank = rank
        self._world = world_size
        self._timeout = timeout  # seconds: init deadline, per-work timeout, host waits
        self._t: _Accessors = _HostTensors if TEST_ON_CPU else _CudaTensors
        # In test mode the host reads the results, so synchronous calls wait for them there.
        self._sync_in_c = not self._t.host_is_device
        self._comms: dict[int, _Comm] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._done = _DoneWork()
        self._pins: dict[int, CudaWork] | None = {} if pin_works else None
        self._pin_lock = threading.Lock()

    # -- communicators ----------------------------------------------------------
    def _index(self, device: torch.device | str) -> int:
        device = torch.device(device) if not isinstance(device, torch.device) else device
        if self._t.host_is_device:
            return self._t.current_device()
        if device.type != "cuda":
            raise ValueError(f"fastspawn: {device} is not a CUDA device")
        return device.index if device.index is not None else self._t.current_device()

    def _exchange_id(self) -> bytes:
        """Rank 0's NCCL unique id, through the store. The counter gives each
        communicator of this group a generation of its own, so a reused store (same
        prefix, after destroy_process_group) never hands out an earlier id."""
        store = self._store
        generation = (store.add("fastspawn/nccl_joins", 1) - 1) // self._world
        key = f"fastspawn/nccl_id/{generation}"
        if self._rank == 0:
            uid = _C.nccl_get_unique_id()
            # (torch's stub says a str value; every c10d store takes bytes too)
            store.set(key, uid)  # type: ignore[arg-type]
            return uid
        return bytes(store.get(key))

    def connect(self, dev: int) -> _Comm:
        """The communicator for device dev, created (collectively) on first use."""
        comm = self._comms.get(dev)
        if comm is not None:
            return comm
        with self._lock:
            comm = self._comms.get(dev)
            if comm is not None:
                return comm
            if self._closed:
                raise _BackendError("fastspawn: the process group was shut down")
            load()
            try:
                uid = self._exchange_id()
                nccl = _C.NcclComm(uid, self._rank, self._world, dev, timeout=self._timeout,
                                   init_timeout=self._timeout)
            except Exception as e:  # noqa: BLE001
                raise _wrap(e) from None
            comm = _Comm(nccl, dev, self._t.comm_stream(nccl.stream, dev))
            self._comms[dev] = comm
            return comm

    def _comm_failed(self, comm: _Comm) -> bool:
        try:
            return comm.nccl.status() is not None
        except ValueError:  # closed
            return True

    @property
    def communicators(self) -> dict[int, _C.NcclComm]:
        """device index -> _C.NcclComm, for tests and diagnostics."""
        return {dev: c.nccl for dev, c in self._comms.items()}

    def backend_view(self, device: torch.device | str) -> _DeviceBackend:
        """What the group answers to _get_backend(device) for a CUDA device."""
        return _DeviceBackend(self)

    def close(self, abort_reason: str | None = None) -> None:
        """Leave every communicator: outstanding works get CLOSE_TIMEOUT seconds, then
        the communicator is aborted (at once with abort_reason)."""
        with self._lock:
            self._closed = True
            comms, self._comms = list(self._comms.values()), {}
        first: BaseException | None = None
        for comm in comms:
            # Queued sends and receives go first and get the same CLOSE_TIMEOUT; their
            # Works (and in test mode their host buffers) live until the close waited.
            queued = list(comm.deferred)
            try:
                if abort_reason is not None:
                    comm.nccl.abort(abort_reason)
                    self._drop_deferred(comm, abort_reason)
                else:
                    first = first or self.issue_deferred(comm)
                comm.nccl.close(0 if abort_reason is not None else CLOSE_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - close the others first
                first = first or e
            queued.clear()
        if first is not None and abort_reason is None:
            raise _wrap(first)

    # -- deferred send / recv ---------------------------------------------------
    # A send or receive outside a coalescing block is queued on its communicator and
    # returns a Work at once; everything queued is issued as ONE NCCL group when
    # anything needs it: any method of one of their Works (wait, is_completed,
    # get_future, synchronize), the next other collective on that communicator (before
    # it), the start of a coalescing block, or the group's shutdown. So two ranks whose
    # sends cross (batch_isend_irecv, which torch runs call by call on a Python group)
    # never wait for each other, whatever the size.
    def _issue_lock(self, comm: _Comm) -> None:
        if not comm.issue_lock.acquire(timeout=self._timeout):
            raise _BackendError(
                f"fastspawn: the queued sends and receives on {self._t.name(comm.dev)} were "
                f"still being issued by another thread after {self._timeout:g} s")

    def defer(self, comm: _Comm, args: _RunArgs, result: _Tensors, t: torch.Tensor) -> CudaWork:
        """Queue one send / recv (args: NcclComm.run's, with the caller's current stream,
        captured now); its Work issues it when asked."""
        work = CudaWork(self, comm, None, result, (t,))
        work._p2p = args
        self._issue_lock(comm)
        try:
            comm.deferred.append(work)
        finally:
            comm.issue_lock.release()
        return work

    def issue_deferred(self, comm: _Comm) -> BaseException | None:
        """Issue comm's queued sends and receives as one NCCL group, each after the work
        on the stream that was current when it was called (C records an event on each
        and makes the communication stream wait for it). A failure becomes every queued
        Work's error (raised by its wait()), and is returned."""
        if not comm.deferred:
            return None
        self._issue_lock(comm)
        try:
            works = comm.deferred
            if not works:  # another thread issued them while this one waited
                return None
            nccl = comm.nccl
            try:
                nccl.group_start()
                try:
                    for w in works:
                        assert w._p2p is not None  # (set until issued, under the lock)
                        nccl.run(*w._p2p)
                finally:
                    nwork = nccl.group_end()
            except Exception as e:  # noqa: BLE001 - the Works' error
                err = _wrap(e)
                for w in works:
                    w._exc, w._p2p, w._keep = err, None, ()
                return err
            for w in works:
                w._nwork, w._p2p = nwork, None
                if not self._t.host_is_device:  # as _finish does for asynchronous calls
                    for t in w._keep:
                        if t is not None and comm.ext is not None:
                            t.record_stream(comm.ext)
                    w._keep = ()
            return None
        finally:
            comm.deferred = []
            comm.issue_lock.release()

    def _drop_deferred(self, comm: _Comm, reason: str) -> None:
        """An abort: queued sends and receives are never issued; their Works fail."""
        self._issue_lock(comm)
        try:
            works, comm.deferred = comm.deferred, []
        finally:
            comm.issue_lock.release()
        for w in works:
            kind = "send" if w._p2p is not None and w._p2p[0] == _SEND else "receive"
            w._exc = _BackendError(f"fastspawn: {reason} before this {kind} was issued")
            w._p2p, w._keep = None, ()

    # -- Works ------------------------------------------------------------------
    def _pin(self, work: CudaWork) -> None:
        assert self._pins is not None  # (called only when pinning)
        with self._pin_lock:
            self._pins[id(work)] = work
            if len(self._pins) > _PIN_CAP:
                del self._pins[next(iter(self._pins))]

    def _unpin(self, work: CudaWork) -> None:
        assert self._pins is not None
        with self._pin_lock:
            self._pins.pop(id(work), None)

    def _finish(self, comm: _Comm, nwork: _C.NcclWork | None, result: Any,
                keep: Sequence[torch.Tensor | None], sync: bool,
                barrier: bool = False) -> _HalfWork:
        """The Work of an enqueued call (nwork None: inside a coalescing block)."""
        if nwork is None:
            if comm.pending is None:  # a call inside a group of our own (or an empty one)
                return self._done
            work = CudaWork(self, comm, None, result, keep)
            comm.pending.append(work)
            return work
        if not self._t.host_is_device:
            if not sync:  # the caching allocator must not reuse them before the work ends
                ext = comm.ext
                for t in keep:
                    if t is not None and t.is_cuda and ext is not None:  # (a host premul
                        t.record_stream(ext)  # scalar was read already)
            keep = ()
        work = CudaWork(self, comm, nwork, result, keep, barrier)
        if sync:
            work.wait()
            return self._done
        return work

    def _run(self, comm: _Comm, *args: Any, **kw: Any) -> _C.NcclWork | None:
        try:
            return comm.nccl.run(*args, **kw)
        except Exception as e:  # noqa: BLE001
            raise _wrap(e) from None

    def _grouped(self, comm: _Comm, runs: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
                 result: Any, keep: Sequence[torch.Tensor | None],
                 sync: bool) -> _HalfWork:
        """Several NCCL calls as one group (one launch, one work)."""
        nccl = comm.nccl
        try:
            nccl.group_start()
            try:
                for args, kw in runs:
                    nccl.run(*args, **kw)
            finally:
                nwork = nccl.group_end()
        except Exception as e:  # noqa: BLE001
            raise _wrap(e) from None
        return self._finish(comm, nwork, result, keep, sync)

    # -- argument checks --------------------------------------------------------
    def _device(self, t: object, what: str) -> int:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastspawn: {what} must be a torch.Tensor, got {type(t).__name__}")
        dev = self._t.device_of(t)
        if dev < 0:
            raise ValueError(f"fastspawn: {what} is on {t.device}, not on a CUDA device")
        return dev

    def _check(self, t: object, what: str, dev: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastspawn: {what} must be a torch.Tensor, got {type(t).__name__}")
        if not self._t.on(t, dev):
            raise ValueError(
                f"fastspawn: {what} is on {t.device}, but this call runs on {self._t.name(dev)} "
                "(where its first tensor is): every tensor of one collective must be on the "
                "same device")
        if t.layout != torch.strided or not _dense(t):
            raise ValueError(
                f"fastspawn: {what} is not a dense tensor (layout {t.layout}, strides "
                f"{tuple(t.stride()) if t.layout == torch.strided else '-'}); CUDA collectives "
                f"need contiguous memory: pass {what.split('[')[0]}.contiguous() (and copy the "
                "result back)")
        return t

    def _first(self, t: object, what: str, p2p: bool = False) -> tuple[_Comm, int]:
        """(communicator, device) for a call whose first tensor is t, checked; a call
        other than a send / recv (p2p) issues the sends and receives queued before it."""
        dev = self._device(t, what)
        comm = self._comms.get(dev) or self.connect(dev)
        self._check(t, what, dev)
        if comm.deferred and not p2p:
            self.issue_deferred(comm)
        return comm, dev

    def _comm_of(self, dev: int) -> _Comm:
        """The communicator of device dev for a collective: queued sends and receives
        issued first."""
        comm = self._comms.get(dev) or self.connect(dev)
        if comm.deferred:
            self.issue_deferred(comm)
        return comm

    def _same(self, tensors: Sequence[torch.Tensor], like: torch.Tensor, what: str,
              dev: int) -> None:
        if len(tensors) != self._world:
            raise ValueError(f"fastspawn: {what} needs {self._world} tensors, got {len(tensors)}")
        for i, t in enumerate(tensors):
            self._check(t, f"{what}[{i}]", dev)
            if t.numel() != like.numel() or t.dtype != like.dtype:
                raise ValueError(f"fastspawn: {what}[{i}] has {t.numel()} {t.dtype} elements, "
                                 f"expected {like.numel()} {like.dtype} like the input")

    def _world_times(self, big: torch.Tensor, small: torch.Tensor, what: str, big_name: str,
                     small_name: str) -> None:
        if big.numel() != small.numel() * self._world or big.dtype != small.dtype:
            raise ValueError(
                f"fastspawn: {what} {big_name} must have world_size ({self._world}) x the "
                f"{small_name}'s {small.numel()} {small.dtype} elements, got {big.numel()} "
                f"{big.dtype}")

    def _peer(self, rank: int, what: str) -> int:
        if not 0 <= rank < self._world:
            raise ValueError(f"fastspawn: {what} rank {rank} is not in 0..{self._world - 1}")
        return rank

    def _reduction(self, opts: Any, t: torch.Tensor, dev: int
                   ) -> tuple[torch.Tensor, int, int, dict[str, Any], torch.Tensor | None]:
        """(tensor as NCCL reduces it, dtype code, op code, premul keywords, premul scalar)."""
        red = opts.reduceOp
        kind = getattr(red, "op", red)
        op = _OP_BY_TYPE.get(kind)
        if op is None:
            name = getattr(kind, "name", None) or str(kind).rsplit(".", 1)[-1]
            if name in ("BAND", "BOR", "BXOR"):
                raise ValueError(f"fastspawn: NCCL has no bitwise reductions ({name}); reduce "
                                 "such tensors on the CPU, where fastspawn has them")
            raise ValueError(f"fastspawn: reduce op {name} is not supported on CUDA tensors "
                             "(NCCL): use SUM, AVG, MIN, MAX, PRODUCT or PREMUL_SUM")
        if t.is_complex():
            if op not in (_C.OP_SUM, _C.OP_AVG):
                raise ValueError("fastspawn: complex tensors support only SUM and AVG")
            t = torch.view_as_real(t)
        code = _DTYPES.get(t.dtype)
        if code is None:
            raise TypeError(
                f"fastspawn: NCCL cannot reduce {t.dtype}; it reduces "
                + ", ".join(str(d).replace("torch.", "") for d in _DTYPES)
                + " (broadcast, all_gather, all_to_all, send/recv move any dtype)")
        if op != _PREMUL:
            return t, code, op, {}, None
        if t.dtype not in _PREMUL_DTYPES:
            raise TypeError(f"fastspawn: PREMUL_SUM takes float16, bfloat16, float32 or "
                            f"float64 tensors, not {t.dtype}")
        try:
            factor = red.factor
        except AttributeError:
            raise ValueError("fastspawn: this torch's ReduceOp does not expose PREMUL_SUM's "
                             "factor (ReduceOp.factor, torch >= 2.2); scale the tensor and "
                             "use SUM instead") from None
        on_device = isinstance(factor, torch.Tensor) and self._t.on(factor, dev)
        if isinstance(factor, torch.Tensor):
            if factor.numel() != 1:
                raise ValueError(f"fastspawn: PREMUL_SUM's factor must have one element, not "
                                 f"{factor.numel()}")
            scalar = (factor.reshape(1).to(t.dtype).contiguous() if on_device
                      else torch.tensor([float(factor.item())], dtype=t.dtype))
        else:
            scalar = torch.tensor([float(factor)], dtype=t.dtype)
        # A host scalar is read during the call (the caller holds it until then), a device
        # one when the collective runs (kept, like the call's tensors, until then).
        kw = {"premul_scalar": scalar.data_ptr(), "premul_scalar_on_device": on_device}
        return t, code, op, kw, scalar

    @staticmethod
    def _sync(opts: Any) -> bool:
        return _HAS_ASYNC_OP and opts is not None and opts.asyncOp is False

def barrier_device(opts: _c10d.BarrierOptions | None) -> int | None:
    """The CUDA device a barrier's options name (device_ids, or a CUDA opts.device),
    or None: then the barrier is the CPU one (what torch passes by default)."""
    if opts is None:
        return None
    ids = getattr(opts, "device_ids", None)
    if ids:
        return ids[0] if torch.cuda.is_available() else None
    device = getattr(opts, "device", None)
    if device is not None and device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


def close_quietly(half: CudaComms) -> None:
    """A group's finalizer: leave its communicators, saying nothing if that fails."""
    try:
        half.close()
    except Exception:  # noqa: BLE001 - best effort when the group is collected
        pass


_G = TypeVar("_G", bound=type)
_test_classes: dict[type, type] = {}


def group_class(base: _G) -> _G:
    """The group class the backend creates: base, or (test only) a subclass of it
    that sends every tensor, CPU ones included, through the NCCL path."""
    if not TEST_ON_CPU:
        return base
    if base not in _test_classes:
        def route(name: str) -> Callable[..., Any]:
            def method(self: Any, *args: Any, **kwargs: Any) -> Any:
                return getattr(self._cuda, name)(*args, **kwargs)
            method.__name__ = name
            return method

        _test_classes[base] = type(base.__name__ + "NcclOnCpu", (base,),
                                   {n: route(n) for n in COLLECTIVES})
    return cast(_G, _test_classes[base])
