"""The "fastspawn" torch.distributed backend: shared-memory collectives for CPU
tensors, NCCL for CUDA tensors, in one process group.

Importing this module registers the backend, so that

    import fastspawn.backend  # noqa: F401
    dist.init_process_group("fastspawn", store=..., rank=..., world_size=...)

gives a process group whose collectives run in C (fastspawn._C.Comm) over one
shared-memory segment for the ranks of one machine. Every dist.* collective and
plain DistributedDataParallel work on it.

How a collective runs: Python hands the tensors' data_ptr(), element count,
dtype and op codes to C. Synchronous calls (async_op=False) and small ones while
nothing is queued run right in the calling thread, with the GIL released.
Others go to the communicator's C worker thread, which runs them in order; a
Python completion thread, blocked in C without the GIL, completes each Work's
torch Future as its collective finishes, so DDP overlaps gradient communication
with the backward pass.

On torch 2.1, which lets go of a Python Work that C++ (DDP) holds, the backend
keeps each Work until its first wait() or get_future() (see
_torch_keeps_python_works).

CPU tensors: non-contiguous ones are copied. Reductions take float32, float64,
float16, bfloat16, int8, uint8, int32, int64, bool (and complex for SUM/AVG);
data-moving collectives take any dtype.

CUDA tensors go to the group's CUDA half (_cuda.py, _cuda_coll.py: NCCL, loaded at the
first CUDA collective, one communicator per device, ProcessGroupNCCL's stream semantics). Each
collective below starts with that dispatch, one attribute test on the CPU path.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
import torch.distributed as dist

# The option structs (AllgatherOptions, ...): torch.distributed re-exports only
# some of them (never AllgatherOptions, up to 2.13 at least); torch 2.1 calls
# allgather without one, so the defaults come from where they are defined.
from torch._C import _distributed_c10d as _c10d

from . import _C, _cuda
from ._cuda_coll import CudaHalf

if TYPE_CHECKING:
    from ._cuda import _DeviceBackend, _HalfWork

_Tensors: TypeAlias = list[torch.Tensor]
# What a collective returns: a CPU Work, or the CUDA half's (CudaWork; _DoneWork for a
# synchronous call); all are torch Works.
_AnyWork: TypeAlias = "Work | _HalfWork"

BACKEND_NAME = "fastspawn"

# Collectives up to this many bytes run in the calling thread when nothing is queued.
INLINE_BYTES = int(os.environ.get("FASTSPAWN_INLINE_BYTES", str(256 << 10)))

# Communicator knobs (fastspawn._C.Comm keywords) from the environment; unset: C defaults.
_COMM_ENV = {"slot_bytes": "FASTSPAWN_SLOT_BYTES", "oneshot_max": "FASTSPAWN_ONESHOT_MAX",
             "spin_ns": "FASTSPAWN_SPIN_NS", "yield_ns": "FASTSPAWN_YIELD_NS"}

_DTYPES = {
    torch.float32: _C.DTYPE_FLOAT32,
    torch.float64: _C.DTYPE_FLOAT64,
    torch.float16: _C.DTYPE_FLOAT16,
    torch.bfloat16: _C.DTYPE_BFLOAT16,
    torch.int8: _C.DTYPE_INT8,
    torch.uint8: _C.DTYPE_UINT8,
    torch.int32: _C.DTYPE_INT32,
    torch.int64: _C.DTYPE_INT64,
    torch.bool: _C.DTYPE_BOOL,
}

_OPS = {
    "SUM": _C.OP_SUM,
    "AVG": _C.OP_AVG,
    "MIN": _C.OP_MIN,
    "MAX": _C.OP_MAX,
    "PRODUCT": _C.OP_PRODUCT,
    "BAND": _C.OP_BAND,
    "BOR": _C.OP_BOR,
    "BXOR": _C.OP_BXOR,
}

# torch's DistBackendError (a RuntimeError); torch 2.1 has none and raises RuntimeError.
if TYPE_CHECKING:
    _BackendError: TypeAlias = dist.DistBackendError
else:
    _BackendError = getattr(dist, "DistBackendError", RuntimeError)

# ReduceOp.RedOpType -> op code, for the fast lookup in _reduce_op.
_OP_BY_TYPE: dict[Any, int] = {}
for _name, _code in _OPS.items():
    _red = getattr(getattr(dist.ReduceOp, "RedOpType", dist.ReduceOp), _name, None)
    if _red is not None:
        _OP_BY_TYPE[_red] = _code
# (dtype, op code) pairs the C kernels implement.
_SUPPORTED = {(dt, op) for dt, code in _DTYPES.items() for op in _OPS.values()
              if _C.reduce_supported(code, op)}


def _wrap_error(exc: BaseException) -> BaseException:
    """C errors (RuntimeError, TimeoutError) as torch's DistBackendError."""
    if isinstance(exc, _BackendError) or not isinstance(exc, (RuntimeError, TimeoutError)):
        return exc
    err = _BackendError(f"fastspawn: {exc}")
    err.__cause__ = exc
    return err


def _seconds(timeout: timedelta | float | None) -> float | None:
    """A wait timeout (timedelta, seconds or None; 0 means none, as in c10d) in seconds."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    timeout = float(timeout)
    return None if timeout <= 0 else timeout


def _check_cpu(t: torch.Tensor, what: str) -> None:
    if type(t) is torch.Tensor and t.is_cpu and t.layout is torch.strided:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastspawn: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(
            f"fastspawn: {what} is on {t.device}, but this call's first tensor is on the CPU: "
            "every tensor of one collective must be on the same device (CPU tensors run on "
            "shared memory, CUDA tensors through NCCL)"
        )
    if t.layout != torch.strided:
        raise ValueError(
            f"fastspawn: {what} has layout {t.layout}; only dense tensors are supported")


def _reduce_op(opts: Any) -> int:
    """The op code of opts.reduceOp (any torch option struct with one)."""
    op = opts.reduceOp
    kind = getattr(op, "op", op)  # ReduceOp -> RedOpType (older torch: the enum itself)
    code = _OP_BY_TYPE.get(kind)
    if code is not None:
        return code
    name = getattr(kind, "name", None) or str(kind).rsplit(".", 1)[-1]
    if name not in _OPS:
        raise ValueError(f"fastspawn: reduce op {name} is not supported")
    return _OPS[name]


def _reduce_dtype(t: torch.Tensor, op: int) -> tuple[torch.Tensor, int]:
    """The tensor as the C side sees it (complex as pairs of reals) and its dtype code."""
    if t.is_complex():
        if op not in (_C.OP_SUM, _C.OP_AVG):
            raise ValueError("fastspawn: complex tensors support only SUM and AVG")
        t = torch.view_as_real(t)
    code = _DTYPES.get(t.dtype)
    if code is not None and (t.dtype, op) in _SUPPORTED:
        return t, code
    if code is None:
        raise TypeError(
            f"fastspawn: reductions do not support {t.dtype}; supported: "
            + ", ".join(str(d).replace("torch.", "") for d in _DTYPES)
        )
    if not _C.reduce_supported(code, op):
        name = next(k for k, v in _OPS.items() if v == op)
        raise TypeError(f"fastspawn: reduce op {name} is not defined for {t.dtype}")
    return t, code


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (for data-moving collectives)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _contiguous(t: torch.Tensor, what: str) -> torch.Tensor:
    _check_cpu(t, what)
    return t if t.is_contiguous() else t.contiguous()


class _Finish:
    """Copies to do once a collective completed (into non-contiguous or list outputs)."""

    def __init__(self) -> None:
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.copies.append((dst, src))

    def inout(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """A contiguous buffer for an in/out tensor; copied back if it is a copy."""
        buf = _contiguous(t, what)
        if buf is not t:
            self.copy(t, buf)
        return buf

    def __bool__(self) -> bool:
        return bool(self.copies)

    def __call__(self) -> None:
        for dst, src in self.copies:
            dst.copy_(src.view(dst.dtype).reshape(dst.shape) if src.dtype != dst.dtype else src)
        self.copies = []


class Work(dist._Work):
    """A fastspawn collective: wait() blocks (without the GIL) until it completed;
    get_future() returns a torch Future, completed by the completion thread."""

    def __init__(self, engine: _Engine, result: Any, ticket: int = 0,
                 finish: Callable[[], None] | None = None,
                 keep: Sequence[torch.Tensor | None] = (), done: bool = False,
                 exc: BaseException | None = None) -> None:
        super().__init__()
        self._engine = engine
        self._ticket = ticket
        self._result = result
        self._finish = finish
        self._keep = keep  # buffers the C side reads or writes until completion
        if engine.pins is not None:
            engine.pin(self)
        self._done = done
        self._exc = exc
        self._fut: torch.futures.Future[Any] | None = None  # made on demand: most calls never ask

    def _complete(self, exc: BaseException | None) -> None:
        with self._engine.work_lock:
            if self._done:
                return
            if exc is None and self._finish is not None:
                try:
                    self._finish()
                except BaseException as e:  # noqa: BLE001 - handed to the waiter
                    exc = e
            self._finish = None
            self._keep = ()
            self._exc = exc
            self._done = True
            if self._fut is not None:
                self._settle(self._fut)

    def _settle(self, fut: torch.futures.Future[Any]) -> None:
        if self._exc is None:
            fut.set_result(self._result)
        else:
            fut.set_exception(self._exc)

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        """Block until the collective completed (up to timeout; None or 0: no limit of
        the caller's, the group timeout applies); raise its error."""
        if self._engine.pins is not None:
            self._engine.unpin(self)
        if not self._done:
            seconds = _seconds(timeout)
            try:
                self._engine.comm.wait(self._ticket, seconds)
            except TimeoutError as e:
                if self._engine.comm.completed() < self._ticket:
                    raise _BackendError(
                        f"fastspawn: collective still running after {seconds} s"
                    ) from e
                self._complete(_wrap_error(e))
            except Exception as e:  # noqa: BLE001 - the collective's own error
                self._complete(_wrap_error(e))
            else:
                self._complete(None)
        if self._exc is not None:
            raise self._exc
        return True

    def get_future(self) -> torch.futures.Future[Any]:
        """A torch Future completed with result() (or the error) when the collective is."""
        if self._engine.pins is not None:
            self._engine.unpin(self)
        with self._engine.work_lock:
            if self._fut is None:
                self._fut = torch.futures.Future()
                if self._done:
                    self._settle(self._fut)
            return self._fut

    def is_completed(self) -> bool:
        """Whether the collective finished (successfully or not); does not block."""
        if not self._done and not self._engine.comm.closed:
            if self._engine.comm.completed() >= self._ticket:
                try:
                    self.wait()
                except Exception:  # noqa: BLE001 - recorded in exception()
                    pass
        return self._done

    def is_success(self) -> bool:
        """Completed without an error."""
        return self._done and self._exc is None

    def exception(self) -> BaseException | None:
        """The collective's error, once completed with one."""
        return self._exc

    def result(self) -> Any:
        """The collective's output tensors (torch's Work.result())."""
        return self._result

    def synchronize(self) -> None:
        """Nothing to do: CPU collectives have no device stream to wait for."""


# At most this many Works pinned per group: async Works a Python caller dropped
# without wait() are pinned too (nothing tells them apart), this bounds them.
_PIN_CAP = 4096

_keeps_python_works: bool | None = None


def _torch_keeps_python_works() -> bool:
    """Whether torch keeps a Python Work alive while C++ holds it (newer torch wraps
    it in a PyWorkHolder).

    Without that (torch 2.1), a Work returned to a C++ caller (DDP's reducer,
    _verify_params_across_processes, _broadcast_coalesced) loses its Python half as
    soon as the call returns: C++ then runs the base Work::wait(), which blocks
    forever, and Work::getFuture(), which raises. Probed once, with a throw-away
    group: the C++ allreduce dispatches to the Python one; only the kept-alive
    Python Work answers get_future() on what C++ returns.
    """
    global _keeps_python_works
    if _keeps_python_works is None:
        class ProbeWork(dist._Work):
            def get_future(self) -> torch.futures.Future[None]:
                fut: torch.futures.Future[None] = torch.futures.Future()
                fut.set_result(None)
                return fut

        class ProbeGroup(dist.ProcessGroup):
            def getBackendName(self) -> str:
                return "fastspawn-probe"

            # (torch's stub overloads allreduce; the probe takes the one form C++ calls)
            def allreduce(self, tensors: _Tensors,  # type: ignore[override]
                          opts: _c10d.AllreduceOptions | None = None) -> dist._Work:
                return ProbeWork()

        try:
            # (ProcessGroup(rank, size): at run time in every torch; the stub names only
            # the (store, rank, size) form)
            probe = ProbeGroup(0, 1)  # type: ignore[call-arg]
            work = dist.ProcessGroup.allreduce(probe, [torch.zeros(1)], _c10d.AllreduceOptions())
            work.get_future()
            _keeps_python_works = True
        except Exception:  # noqa: BLE001 - "Work::getFuture not implemented": the
            _keeps_python_works = False  # base C++ Work (or no answer: pin, to be safe)
    return _keeps_python_works


def _done_work(engine: _Engine, result: Any, exc: BaseException | None = None) -> Work:
    return Work(engine, result, done=True, exc=exc)


class _Engine:
    """The communicator, the queue of pending Works and the completion thread."""

    def __init__(self, comm: _C.Comm, pin_works: bool) -> None:
        self.comm = comm
        self.pins: dict[int, Work] | None = None  # not for sync_done, kept by the engine anyway
        self.lock = threading.Lock()
        self.work_lock = threading.RLock()  # completes Works (re-entered by future callbacks)
        self.works: dict[int, Work] = {}
        self.thread: threading.Thread | None = None
        self.closing = False
        # Returned by every successful synchronous call (asyncOp=False): torch only
        # wait()s on those, and a Work object costs more than a small collective.
        self.sync_done = Work(self, [], done=True)
        # Works kept alive for C++ callers until their first wait() or get_future()
        # (see _torch_keeps_python_works); None where torch keeps them itself.
        self.pins = {} if pin_works else None
        self.pin_lock = threading.Lock()

    def pin(self, work: Work) -> None:
        """Keep work alive (torch 2.1: see _torch_keeps_python_works)."""
        assert self.pins is not None  # (called only when pinning)
        with self.pin_lock:
            self.pins[id(work)] = work
            if len(self.pins) > _PIN_CAP:
                del self.pins[next(iter(self.pins))]  # the oldest

    def unpin(self, work: Work) -> None:
        """Let go of a pinned work (its first wait() or get_future())."""
        assert self.pins is not None
        with self.pin_lock:
            self.pins.pop(id(work), None)

    def launch(self, args: tuple[int, int, int, int, int, int, int], result: Any,
               finish: Callable[[], None] | None = None,
               keep: Sequence[torch.Tensor | None] = (), sync: bool = False,
               nbytes: int = 0) -> Work:
        """Run one collective: inline (sync, or small with nothing queued) or queued."""
        if self.closing or self.comm.closed:
            raise _BackendError("fastspawn: the process group was shut down")
        if sync or (nbytes <= INLINE_BYTES and not self.works):
            try:
                self.comm.run(*args)
                if finish is not None:
                    finish()
            except Exception as e:  # noqa: BLE001 - reported through the Work
                return _done_work(self, result, _wrap_error(e))
            return self.sync_done if sync else Work(self, result, done=True)
        work = Work(self, result, finish=finish, keep=keep)
        with self.lock:
            work._ticket = self.comm.submit(*args)
            self.works[work._ticket] = work
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._loop, name="fastspawn-completion", daemon=True
                )
                self.thread.start()
        return work

    def _loop(self) -> None:
        ticket = 1
        while True:
            exc: BaseException | None = None
            try:
                self.comm.wait(ticket)
            except ConnectionError:
                if self.closing:
                    break  # not submitted, and never will be
                exc = _BackendError("fastspawn: communicator closed")
            except BaseException as e:  # noqa: BLE001 - the collective's error
                exc = _wrap_error(e)
            with self.lock:
                work = self.works.pop(ticket, None)
            if work is not None:  # tickets of blocking run() calls have no Work
                work._complete(exc)
            ticket += 1

    def close(self, abort_reason: str | None = None) -> None:
        """Let queued collectives finish (or abort them), stop the completion thread,
        leave the communicator."""
        with self.lock:
            if self.closing:
                return
            self.closing = True
        if self.comm.closed:
            return
        if abort_reason is not None:
            self.comm.abort(abort_reason)
        self.comm.shutdown_waiters()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.comm.close()


_live_engines: weakref.WeakSet[_Engine] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for engine in list(_live_engines):
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _exchange_handle(store: dist.Store, rank: int, world_size: int, **comm_kw: Any) -> _C.Comm:
    """Rank 0 creates the segment and publishes its handle; the others open it from
    the store; then every rank joins. Returns the joined communicator.

    A handle is good only until every rank joined (rank 0 then closes the segment's
    descriptor), so rank 0 deletes the key then. A generation counter keeps a reused
    store (same prefix) from handing out the handle of an earlier group's segment.
    """
    generation = (store.add("fastspawn/shm_joins", 1) - 1) // world_size
    key = f"fastspawn/shm_handle/{generation}"
    if rank == 0:
        comm = _C.Comm(None, 0, world_size, **comm_kw)
    else:
        value = store.get(key)
        handle = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
        comm = _C.Comm(handle, rank, world_size, **comm_kw)
    try:
        if rank == 0:
            store.set(key, comm.handle)
        comm.join()
    except BaseException:
        comm.close()  # peers waiting in join hear of it at once
        raise
    if rank == 0:
        try:
            store.delete_key(key)  # every rank has read it
        except (RuntimeError, NotImplementedError):
            pass  # a store that cannot delete keeps a dead handle; the generation skips it
    return comm


class ProcessGroupFastspawn(dist.ProcessGroup):
    """A torch.distributed ProcessGroup over fastspawn's shared-memory collectives (CPU
    tensors) and NCCL (CUDA tensors): one group for both devices.

    ``ProcessGroupFastspawn(store, rank, world_size, timeout)`` is what the backend
    creator makes (``dist.init_process_group("fastspawn", ...)``); every rank of the
    group makes one, with the same store. Keywords are fastspawn._C.Comm's knobs."""

    def __init__(self, store: dist.Store, rank: int, world_size: int,
                 timeout: timedelta | float | None = timedelta(minutes=30),
                 **comm_kw: Any) -> None:
        # (ProcessGroup(rank, size): at run time in every torch, the only form torch 2.1
        # has; the stub names only the (store, rank, size) one)
        super().__init__(rank, world_size)  # type: ignore[call-arg]
        self._rank = rank
        self._world_size = world_size
        seconds = _seconds(timeout) or 1800.0
        for key, env in _COMM_ENV.items():
            if key not in comm_kw and os.environ.get(env):
                comm_kw[key] = int(os.environ[env])
        comm = _exchange_handle(store, rank, world_size, timeout=seconds, connect_timeout=seconds,
                                **comm_kw)
        self._engine = _Engine(comm, pin_works=not _torch_keeps_python_works())
        _live_engines.add(self._engine)
        weakref.finalize(self, self._engine.close)
        # CUDA tensors: NCCL, nothing loaded or connected before the first CUDA collective.
        self._cuda = CudaHalf(store, rank, world_size, seconds,
                              pin_works=self._engine.pins is not None)
        weakref.finalize(self, _cuda.close_quietly, self._cuda)

    # -- identity ---------------------------------------------------------------
    def getBackendName(self) -> str:
        """ "fastspawn" (torch asks for it by its C++ name)."""
        return BACKEND_NAME

    def getRank(self) -> int:
        """This rank in the group."""
        return self._rank

    def getSize(self) -> int:
        """The number of ranks."""
        return self._world_size

    def __repr__(self) -> str:
        return f"ProcessGroupFastspawn(rank={self._rank}, world_size={self._world_size})"

    # -- lifetime ---------------------------------------------------------------
    def shutdown(self) -> None:
        """Let queued collectives finish, then leave the communicators."""
        self._engine.close()
        self._cuda.close()

    def abort(self) -> None:
        """Fail every pending collective here and on every peer, then leave."""
        reason = f"rank {self._rank} aborted the process group"
        self._cuda.close(abort_reason=reason)
        self._engine.close(abort_reason=reason)

    # (for CUDA devices the answer is a view that does what torch asks of it, not a torch
    # Backend)
    def _get_backend(  # type: ignore[override]
            self, device: torch.device | str) -> _DeviceBackend | _c10d.Backend:
        """torch asks this for the backend of a device (init_process_group(device_id=...)
        connects eagerly through what it answers for a CUDA device)."""
        if torch.device(device).type == "cuda":
            return self._cuda.backend_view(device)
        return super()._get_backend(torch.device(device))

    # -- helpers ----------------------------------------------------------------
    def _launch(self, kind: int, dtype: int, op: int, root: int, send: torch.Tensor | None,
                recv: torch.Tensor | None, count: int, result: Any, *, opts: Any = None,
                finish: _Finish | None = None, keep: tuple[torch.Tensor | None, ...] = (),
                nbytes: int = 0) -> Work:
        sync = opts is not None and getattr(opts, "asyncOp", True) is False
        args = (kind, dtype, op, root, send.data_ptr() if send is not None else 0,
                recv.data_ptr() if recv is not None else 0, count)
        return self._engine.launch(args, result, finish=finish or None, keep=keep, sync=sync,
                                   nbytes=nbytes)

    def _root(self, opts: Any) -> int:
        root = opts.rootRank
        if not 0 <= root < self._world_size:
            raise ValueError(f"fastspawn: root rank {root} is not in 0..{self._world_size - 1}")
        return root

    @staticmethod
    def _single(tensors: Sequence[Any], what: str) -> Any:
        if len(tensors) != 1:
            raise ValueError(
                f"fastspawn: {what} takes exactly one tensor per rank, got {len(tensors)}")
        return tensors[0]

    def _check_same(self, tensors: Sequence[torch.Tensor], like: torch.Tensor, what: str) -> None:
        if len(tensors) != self._world_size:
            raise ValueError(
                f"fastspawn: {what} needs {self._world_size} tensors, got {len(tensors)}"
            )
        for i, t in enumerate(tensors):
            _check_cpu(t, f"{what}[{i}]")
            if t.numel() != like.numel() or t.dtype != like.dtype:
                raise ValueError(
                    f"fastspawn: {what}[{i}] has {t.numel()} {t.dtype} elements, expected "
                    f"{like.numel()} {like.dtype} like the input"
                )

    # -- reductions -------------------------------------------------------------
    def allreduce(self, tensors: _Tensors,  # type: ignore[override]
                  opts: _c10d.AllreduceOptions | None = None) -> _AnyWork:
        """all_reduce of tensors[0], in place."""
        opts = opts if opts is not None else _c10d.AllreduceOptions()
        t = self._single(tensors, "allreduce")
        op = _reduce_op(opts)
        if (type(t) is torch.Tensor and t.is_cpu and t.layout is torch.strided
                and t.is_contiguous() and (t.dtype, op) in _SUPPORTED):
            # the common case, kept short: small collectives are mostly this overhead
            ptr, n = t.data_ptr(), t.numel()
            return self._engine.launch(
                (_C.COLL_ALLREDUCE, _DTYPES[t.dtype], op, 0, ptr, ptr, n), tensors, keep=(t,),
                sync=getattr(opts, "asyncOp", True) is False, nbytes=n * t.element_size())
        if t.is_cuda:
            return self._cuda.allreduce(tensors, opts)
        finish = _Finish()
        buf = finish.inout(t, "allreduce tensor")
        view, code = _reduce_dtype(buf, op)
        return self._launch(_C.COLL_ALLREDUCE, code, op, 0, view, view, view.numel(), tensors,
                            opts=opts, finish=finish, keep=(buf,), nbytes=buf.nbytes)

    def allreduce_coalesced(self, tensors: _Tensors,
                            opts: _c10d.AllreduceCoalescedOptions | None = None) -> _AnyWork:
        """all_reduce of every tensor (one dtype) in one collective, in place."""
        if tensors and tensors[0].is_cuda:
            return self._cuda.allreduce_coalesced(tensors, opts)
        opts = opts if opts is not None else _c10d.AllreduceCoalescedOptions()
        if not tensors:
            return _done_work(self._engine, tensors)
        op = _reduce_op(opts)
        for i, t in enumerate(tensors):
            _check_cpu(t, f"allreduce_coalesced tensor {i}")
            if t.dtype != tensors[0].dtype:
                raise TypeError("fastspawn: allreduce_coalesced tensors must share one dtype")
        flat = torch.cat([t.reshape(-1) for t in tensors])
        view, code = _reduce_dtype(flat, op)
        finish = _Finish()
        offset = 0
        for t in tensors:
            finish.copy(t, flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        return self._launch(_C.COLL_ALLREDUCE, code, op, 0, view, view, view.numel(), tensors,
                            opts=opts, finish=finish, keep=(flat,), nbytes=flat.nbytes)

    def reduce(self, tensors: _Tensors,  # type: ignore[override]
               opts: _c10d.ReduceOptions | None = None) -> _AnyWork:
        """reduce of tensors[0] onto opts.rootRank (in place there)."""
        if tensors and tensors[0].is_cuda:
            return self._cuda.reduce(tensors, opts)
        opts = opts if opts is not None else _c10d.ReduceOptions()
        t = self._single(tensors, "reduce")
        op, root = _reduce_op(opts), self._root(opts)
        finish = _Finish()
        buf = (finish.inout(t, "reduce tensor") if root == self._rank
               else _contiguous(t, "reduce tensor"))
        view, code = _reduce_dtype(buf, op)
        recv = view if root == self._rank else None
        return self._launch(_C.COLL_REDUCE, code, op, root, view, recv, view.numel(), tensors,
                            opts=opts, finish=finish, keep=(buf,), nbytes=buf.nbytes)

    def reduce_scatter(self, output_tensors: _Tensors,  # type: ignore[override]
                       input_tensors: list[_Tensors],
                       opts: _c10d.ReduceScatterOptions | None = None) -> _AnyWork:
        """reduce_scatter: rank q gets the reduction of every rank's input_tensors[0][q]."""
        if output_tensors and output_tensors[0].is_cuda:
            return self._cuda.reduce_scatter(output_tensors, input_tensors, opts)
        opts = opts if opts is not None else _c10d.ReduceScatterOptions()
        out = self._single(output_tensors, "reduce_scatter output")
        inputs = self._single(input_tensors, "reduce_scatter input")
        _check_cpu(out, "reduce_scatter output")
        self._check_same(inputs, out, "reduce_scatter input list")
        op = _reduce_op(opts)
        flat = torch.cat([t.reshape(-1) for t in inputs])
        return self._reduce_scatter_flat(out, flat, op, opts, output_tensors, keep=(flat,))

    def _reduce_scatter_flat(self, out: torch.Tensor, flat: torch.Tensor, op: int, opts: Any,
                             result: _Tensors,
                             keep: tuple[torch.Tensor | None, ...] = ()) -> Work:
        finish = _Finish()
        buf = finish.inout(out, "reduce_scatter output")
        recv_view, code = _reduce_dtype(buf, op)
        send_view, _ = _reduce_dtype(flat, op)
        return self._launch(_C.COLL_REDUCE_SCATTER, code, op, 0, send_view, recv_view,
                            recv_view.numel(), result, opts=opts, finish=finish,
                            keep=keep + (buf, flat), nbytes=flat.nbytes)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: _c10d.ReduceScatterOptions | None = None) -> _AnyWork:
        """reduce_scatter_tensor: rank q gets the reduction of block q of every input."""
        if output.is_cuda:
            return self._cuda.reduce_scatter_single(output, input, opts)
        opts = opts if opts is not None else _c10d.ReduceScatterOptions()
        _check_cpu(output, "reduce_scatter output")
        if input.numel() != output.numel() * self._world_size or input.dtype != output.dtype:
            raise ValueError(
                f"fastspawn: reduce_scatter input must have world_size ({self._world_size}) x "
                f"the output's {output.numel()} {output.dtype} elements, got "
                f"{input.numel()} {input.dtype}"
            )
        flat = _contiguous(input, "reduce_scatter input")
        return self._reduce_scatter_flat(output, flat, _reduce_op(opts), opts, [output])

    # (the stub spells the parameters outputTensor, inputTensor; torch passes them by position)
    _reduce_scatter_base = reduce_scatter_single  # type: ignore[assignment]

    def reduce_scatter_tensor_coalesced(
            self, outputs: _Tensors, inputs: _Tensors,
            opts: _c10d.ReduceScatterOptions | None = None) -> _AnyWork:
        """reduce_scatter_single of each (output, input) pair; the last one's Work."""
        if outputs and outputs[0].is_cuda:
            return self._cuda.reduce_scatter_tensor_coalesced(outputs, inputs, opts)
        works = [self.reduce_scatter_single(o, i, opts)
                 for o, i in zip(outputs, inputs, strict=False)]
        return works[-1] if works else _done_work(self._engine, outputs)

    # (the stub spells the parameters outputTensors, inputTensors; passed by position)
    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced  # type: ignore[assignment]

    # -- data movement ----------------------------------------------------------
    def broadcast(self, tensors: _Tensors,  # type: ignore[override]
                  opts: _c10d.BroadcastOptions | None = None) -> _AnyWork:
        """broadcast of tensors[0] from opts.rootRank."""
        if tensors and tensors[0].is_cuda:
            return self._cuda.broadcast(tensors, opts)
        opts = opts if opts is not None else _c10d.BroadcastOptions()
        t = self._single(tensors, "broadcast")
        root = self._root(opts)
        finish = _Finish()
        buf = finish.inout(t, "broadcast tensor")
        data = _as_bytes(buf)
        return self._launch(_C.COLL_BROADCAST, _C.DTYPE_UINT8, 0, root, None, data, data.numel(),
                            tensors, opts=opts, finish=finish, keep=(buf,), nbytes=data.numel())

    def allgather(self, output_tensors: list[_Tensors],  # type: ignore[override]
                  input_tensors: _Tensors,
                  opts: _c10d.AllgatherOptions | None = None) -> _AnyWork:
        """all_gather: output_tensors[0][q] gets rank q's input_tensors[0]."""
        if input_tensors and input_tensors[0].is_cuda:
            return self._cuda.allgather(output_tensors, input_tensors, opts)
        opts = opts if opts is not None else _c10d.AllgatherOptions()
        outs = self._single(output_tensors, "allgather output")
        inp = _contiguous(self._single(input_tensors, "allgather input"), "allgather input")
        self._check_same(outs, inp, "allgather output list")
        flat = torch.empty(inp.nbytes * self._world_size, dtype=torch.uint8)
        finish = _Finish()
        for q, o in enumerate(outs):
            finish.copy(o, flat[q * inp.nbytes:(q + 1) * inp.nbytes])
        src = _as_bytes(inp)
        return self._launch(_C.COLL_ALLGATHER, _C.DTYPE_UINT8, 0, 0, src, flat, src.numel(),
                            output_tensors, opts=opts, finish=finish, keep=(inp, flat),
                            nbytes=flat.numel())

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
                          opts: _c10d.AllgatherOptions | None = None) -> _AnyWork:
        """all_gather_into_tensor: block q of output gets rank q's input."""
        if input.is_cuda:
            return self._cuda.all_gather_single(output, input, opts)
        opts = opts if opts is not None else _c10d.AllgatherOptions()
        _check_cpu(output, "all_gather output")
        inp = _contiguous(input, "all_gather input")
        if output.numel() != inp.numel() * self._world_size or output.dtype != inp.dtype:
            raise ValueError(
                f"fastspawn: all_gather output must hold world_size ({self._world_size}) x the "
                f"input's {inp.numel()} {inp.dtype} elements, got {output.numel()} {output.dtype}"
            )
        finish = _Finish()
        buf = finish.inout(output, "all_gather output")
        src, dst = _as_bytes(inp), _as_bytes(buf)
        return self._launch(_C.COLL_ALLGATHER, _C.DTYPE_UINT8, 0, 0, src, dst, src.numel(),
                            [output], opts=opts, finish=finish, keep=(inp, buf),
                            nbytes=dst.numel())

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(
            self, outputs: _Tensors, inputs: _Tensors,
            opts: _c10d.AllgatherOptions | None = None) -> _AnyWork:
        """all_gather_single of each (output, input) pair; the last one's Work."""
        if inputs and inputs[0].is_cuda:
            return self._cuda.allgather_into_tensor_coalesced(outputs, inputs, opts)
        works = [self.all_gather_single(o, i, opts)
                 for o, i in zip(outputs, inputs, strict=False)]
        return works[-1] if works else _done_work(self._engine, outputs)

    # (the stub spells the parameters output_lists, input_list; passed by position)
    all_gather_single_coalesced = allgather_into_tensor_coalesced  # type: ignore[assignment]

    def gather(self, output_tensors: list[_Tensors],  # type: ignore[override]
               input_tensors: _Tensors,
               opts: _c10d.GatherOptions | None = None) -> _AnyWork:
        """gather: on opts.rootRank, output_tensors[0][q] gets rank q's input_tensors[0]."""
        if input_tensors and input_tensors[0].is_cuda:
            return self._cuda.gather(output_tensors, input_tensors, opts)
        opts = opts if opts is not None else _c10d.GatherOptions()
        root = self._root(opts)
        inp = _contiguous(self._single(input_tensors, "gather input"), "gather input")
        src = _as_bytes(inp)
        finish = _Finish()
        flat = None
        if root == self._rank:
            outs = self._single(output_tensors, "gather output")
            self._check_same(outs, inp, "gather output list")
            flat = torch.empty(inp.nbytes * self._world_size, dtype=torch.uint8)
            for q, o in enumerate(outs):
                finish.copy(o, flat[q * inp.nbytes:(q + 1) * inp.nbytes])
        return self._launch(_C.COLL_GATHER, _C.DTYPE_UINT8, 0, root, src, flat, src.numel(),
                            output_tensors, opts=opts, finish=finish, keep=(inp, flat),
                            nbytes=src.numel() * self._world_size)

    def scatter(self, output_tensors: _Tensors,  # type: ignore[override]
                input_tensors: list[_Tensors],
                opts: _c10d.ScatterOptions | None = None) -> _AnyWork:
        """scatter: rank q's output_tensors[0] gets the root's input_tensors[0][q]."""
        if output_tensors and output_tensors[0].is_cuda:
            return self._cuda.scatter(output_tensors, input_tensors, opts)
        opts = opts if opts is not None else _c10d.ScatterOptions()
        root = self._root(opts)
        out = self._single(output_tensors, "scatter output")
        _check_cpu(out, "scatter output")
        finish = _Finish()
        buf = finish.inout(out, "scatter output")
        dst = _as_bytes(buf)
        flat = None
        if root == self._rank:
            inputs = self._single(input_tensors, "scatter input")
            self._check_same(inputs, out, "scatter input list")
            flat = torch.cat([_as_bytes(_contiguous(t, "scatter input")) for t in inputs])
        return self._launch(_C.COLL_SCATTER, _C.DTYPE_UINT8, 0, root, flat, dst, dst.numel(),
                            output_tensors, opts=opts, finish=finish, keep=(buf, flat),
                            nbytes=dst.numel() * self._world_size)

    def alltoall(self, output_tensors: _Tensors,  # type: ignore[override]
                 input_tensors: _Tensors,
                 opts: _c10d.AllToAllOptions | None = None) -> _AnyWork:
        """all_to_all of lists: output_tensors[q] gets rank q's input_tensors[this rank]."""
        if input_tensors and input_tensors[0].is_cuda:
            return self._cuda.alltoall(output_tensors, input_tensors, opts)
        opts = opts if opts is not None else _c10d.AllToAllOptions()
        n = self._world_size
        if len(output_tensors) != n or len(input_tensors) != n:
            raise ValueError(f"fastspawn: alltoall needs {n} input and {n} output tensors")
        ins = [_contiguous(t, f"alltoall input[{q}]") for q, t in enumerate(input_tensors)]
        for q, t in enumerate(output_tensors):
            _check_cpu(t, f"alltoall output[{q}]")
        return self._alltoall_blocks([_as_bytes(t) for t in ins],
                                     [(t, t.nbytes) for t in output_tensors], output_tensors,
                                     opts, keep=tuple(ins))

    def all_to_all_single(self, output: torch.Tensor,  # type: ignore[override]
                          input: torch.Tensor, output_split_sizes: list[int],
                          input_split_sizes: list[int],
                          opts: _c10d.AllToAllOptions | None = None) -> _AnyWork:
        """all_to_all_single: rows of input to each rank by input_split_sizes (even when
        empty), into output by output_split_sizes."""
        if input.is_cuda:
            return self._cuda.all_to_all_single(output, input, output_split_sizes,
                                           input_split_sizes, opts)
        opts = opts if opts is not None else _c10d.AllToAllOptions()
        n = self._world_size
        _check_cpu(output, "all_to_all output")
        inp = _contiguous(input, "all_to_all input")
        finish = _Finish()
        buf = finish.inout(output, "all_to_all output")
        if not output_split_sizes and not input_split_sizes:
            if inp.numel() % n or inp.nbytes != buf.nbytes:
                raise ValueError(
                    f"fastspawn: all_to_all without splits needs equal input and output sizes "
                    f"divisible by world_size {n}"
                )
            src, dst = _as_bytes(inp), _as_bytes(buf)
            return self._launch(_C.COLL_ALLTOALL, _C.DTYPE_UINT8, 0, 0, src, dst,
                                src.numel() // n, [output], opts=opts, finish=finish,
                                keep=(inp, buf), nbytes=src.numel())
        ins = self._split_rows(inp, input_split_sizes, "input")
        outs = self._split_rows(buf, output_split_sizes, "output")
        work = self._alltoall_blocks([_as_bytes(t) for t in ins],
                                     [(t, t.nbytes) for t in outs], [output], opts,
                                     keep=(inp, buf), finish=finish)
        return work

    alltoall_base = all_to_all_single  # type: ignore[assignment]  # (overloaded in the stub)

    def _split_rows(self, t: torch.Tensor, splits: Sequence[int], what: str) -> _Tensors:
        n = self._world_size
        if not splits:
            if t.shape[0] % n if t.dim() else True:
                raise ValueError(f"fastspawn: all_to_all {what} rows are not divisible by {n}")
            splits = [t.shape[0] // n] * n
        if len(splits) != n or sum(splits) != (t.shape[0] if t.dim() else 0):
            raise ValueError(f"fastspawn: all_to_all {what} split sizes {list(splits)} do not "
                             f"match {n} ranks and {t.shape[0] if t.dim() else 0} rows")
        return list(torch.split(t, list(splits), dim=0))

    def _alltoall_blocks(self, ins: _Tensors, outs: list[tuple[torch.Tensor, int]],
                         result: _Tensors, opts: Any,
                         keep: tuple[torch.Tensor | None, ...] = (),
                         finish: _Finish | None = None) -> Work:
        """all_to_all of byte blocks ins[q] -> rank q, outs[q] (tensor, bytes) <- rank q.

        Equal blocks go straight to C; uneven ones are padded to the largest block
        of any rank (the send sizes are all-gathered first)."""
        n = self._world_size
        finish = finish if finish is not None else _Finish()
        send_sizes = torch.tensor([b.numel() for b in ins], dtype=torch.int64)
        sizes = torch.empty(n * n, dtype=torch.int64)
        self._engine.comm.run(_C.COLL_ALLGATHER, _C.DTYPE_INT64, 0, 0, send_sizes.data_ptr(),
                              sizes.data_ptr(), n)
        sizes = sizes.view(n, n)  # sizes[p][q]: bytes rank p sends to rank q
        for q, (_, nbytes) in enumerate(outs):
            if int(sizes[q][self._rank]) != nbytes:
                raise ValueError(
                    f"fastspawn: all_to_all: rank {q} sends {int(sizes[q][self._rank])} bytes "
                    f"to rank {self._rank}, which expects {nbytes}"
                )
        block = int(sizes.max())
        send = torch.zeros(n * block, dtype=torch.uint8)
        for q, b in enumerate(ins):
            send[q * block:q * block + b.numel()] = b
        recv = torch.empty(n * block, dtype=torch.uint8)
        for q, (t, nbytes) in enumerate(outs):
            finish.copy(t, recv[q * block:q * block + nbytes])
        return self._launch(_C.COLL_ALLTOALL, _C.DTYPE_UINT8, 0, 0, send, recv, block, result,
                            opts=opts, finish=finish, keep=keep + (send, recv),
                            nbytes=send.numel())

    def barrier(self, opts: _c10d.BarrierOptions | None = None) -> _AnyWork:  # type: ignore[override]
        """A barrier of the group: the CPU one, or on a GPU when opts names one
        (dist.barrier(device_ids=[...]))."""
        if _cuda.barrier_device(opts) is not None:  # dist.barrier(device_ids=[...])
            return self._cuda.barrier(opts)
        return self._launch(_C.COLL_BARRIER, 0, 0, 0, None, None, 0, [], opts=opts)

    # -- CUDA only ----------------------------------------------------------------
    def send(self, tensors: _Tensors, dstRank: int, tag: int = 0) -> _AnyWork:
        """Send tensors[0] to dstRank: CUDA tensors only (deferred, see _cuda.CudaComms)."""
        if tensors and tensors[0].is_cuda:
            return self._cuda.send(tensors, dstRank, tag)
        raise _no_cpu_p2p()

    def recv(self, tensors: _Tensors, srcRank: int, tag: int = 0) -> _AnyWork:
        """Receive into tensors[0] from srcRank: CUDA tensors only (deferred)."""
        if tensors and tensors[0].is_cuda:
            return self._cuda.recv(tensors, srcRank, tag)
        raise _no_cpu_p2p()

    def recv_anysource(self, tensors: _Tensors, tag: int = 0) -> _AnyWork:
        """Not supported: NCCL (and the CPU half) need the sending rank."""
        if tensors and tensors[0].is_cuda:
            return self._cuda.recv_anysource(tensors, tag)
        raise _no_cpu_p2p()

    # torch's _coalescing_manager(group, device): the collectives in between go to NCCL
    # as one group; on the CPU each runs as it comes (nothing to gain from grouping).
    def _start_coalescing(self, device: torch.device) -> None:
        if torch.device(device).type == "cuda":
            self._cuda._start_coalescing(device)

    def _end_coalescing(self, device: torch.device) -> _AnyWork:
        if torch.device(device).type == "cuda":
            return self._cuda._end_coalescing(device)
        return self._engine.sync_done


def _no_cpu_p2p() -> Exception:
    return NotImplementedError(
        "fastspawn: send/recv of CPU tensors is not supported yet (CUDA tensors are); "
        "use a collective, or a gloo group for them: dist.new_group(backend='gloo')")


def _create(*args: Any) -> ProcessGroupFastspawn:
    """The backend creator, for both register_backend call shapes:
    (store, rank, world_size, timeout) and, with extended_api, (DistributedBackendOptions,
    backend options)."""
    group = _cuda.group_class(ProcessGroupFastspawn)  # (a test-only subclass, see _cuda)
    if len(args) == 2:
        bopts = args[0]
        return group(bopts.store, bopts.group_rank, bopts.group_size, bopts.timeout)
    store, rank, world_size, timeout = args
    return group(store, rank, world_size, timeout)


def register() -> None:
    """Register "fastspawn" with torch.distributed (idempotent)."""
    if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}):
        return
    try:
        dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu", "cuda"])
    except TypeError:  # a torch without the devices argument
        dist.Backend.register_backend(BACKEND_NAME, _create)


register()
