"""The collectives of the fastspawn group's CUDA half (_cuda.py has the rest: loading,
streams and works, communicators): one method per ProcessGroup method, by torch's
names and arguments (_cuda.COLLECTIVES), on CUDA tensors.

- Reductions use the tensor's dtype (complex as pairs of reals); every data-moving
  collective moves bytes, so any dtype travels.
- all_gather into a list is one NCCL broadcast per rank straight into each output,
  gather / scatter / all_to_all of lists are grouped send/recv (as torch does): no
  flat buffers and no copies after the collective, so a work ends with its NCCL
  call. reduce_scatter of a list concatenates its inputs on the caller's stream.
- The *_coalesced variants and torch's coalescing blocks are one NCCL group: one
  launch, one work.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._C import _distributed_c10d as _c10d

from ._cuda import (
    _ALLGATHER,
    _ALLREDUCE,
    _ALLTOALL,
    _ALLTOALLV,
    _BARRIER,
    _BROADCAST,
    _BYTES,
    _DTYPES,
    _HAS_ASYNC_OP,
    _OP_BY_TYPE,
    _PREMUL,
    _RECV,
    _REDUCE,
    _REDUCE_SCATTER,
    _SEND,
    CudaComms,
    _Comm,
    _HalfWork,
    _RunArgs,
    _single,
    _Tensors,
    _wrap,
    barrier_device,
)


class CudaHalf(CudaComms):
    """NCCL communicators of one fastspawn group and its collectives on CUDA tensors."""

    # -- reductions -------------------------------------------------------------
    def allreduce(self, tensors: _Tensors, opts: _c10d.AllreduceOptions | None = None
                  ) -> _HalfWork:
        if opts is None:
            opts = _c10d.AllreduceOptions()
        t = _single(tensors, "allreduce")
        dev = self._t.device_of(t)
        comm = self._comms.get(dev)
        if comm is None:
            comm = self.connect(self._device(t, "allreduce tensor"))
        if comm.deferred:  # queued sends and receives go first
            self.issue_deferred(comm)
        code = _DTYPES.get(t.dtype)
        # (ReduceOp.op, its RedOpType: there at run time, not in torch's stub)
        op = _OP_BY_TYPE.get(opts.reduceOp.op)  # type: ignore[attr-defined]
        if code is None or op is None or op == _PREMUL or not t.is_contiguous():
            return self._allreduce_slow(comm, dev, t, tensors, opts)
        # the common case, kept short: this is most of a small collective's host time
        ptr = t.data_ptr()
        stream = self._t.stream(dev)
        sync = _HAS_ASYNC_OP and opts.asyncOp is False
        try:
            if sync and self._sync_in_c:
                comm.nccl.run(_ALLREDUCE, code, t.numel(), ptr, ptr, op, 0, stream, True)
                return self._done
            nwork = comm.nccl.run(_ALLREDUCE, code, t.numel(), ptr, ptr, op, 0, stream)
        except Exception as e:  # noqa: BLE001
            raise _wrap(e) from None
        return self._finish(comm, nwork, tensors, (t,), sync)

    def _allreduce_slow(self, comm: _Comm, dev: int, t: torch.Tensor, tensors: _Tensors,
                        opts: _c10d.AllreduceOptions) -> _HalfWork:
        self._check(t, "allreduce tensor", dev)
        view, code, op, kw, scalar = self._reduction(opts, t, dev)
        ptr = view.data_ptr()
        nwork = self._run(comm, _ALLREDUCE, code, view.numel(), ptr, ptr, op, 0,
                          self._t.stream(dev), **kw)
        return self._finish(comm, nwork, tensors, (t, scalar), self._sync(opts))

    def allreduce_coalesced(self, tensors: _Tensors,
                            opts: _c10d.AllreduceCoalescedOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.AllreduceCoalescedOptions()
        if not tensors:
            return self._done
        comm, dev = self._first(tensors[0], "allreduce_coalesced tensor 0")
        stream = self._t.stream(dev)
        runs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        keep: list[torch.Tensor | None] = []
        for i, t in enumerate(tensors):
            self._check(t, f"allreduce_coalesced tensor {i}", dev)
            view, code, op, kw, scalar = self._reduction(opts, t, dev)
            ptr = view.data_ptr()
            runs.append(((_ALLREDUCE, code, view.numel(), ptr, ptr, op, 0, stream), kw))
            keep += [t, scalar]
        return self._grouped(comm, runs, tensors, keep, self._sync(opts))

    def reduce(self, tensors: _Tensors, opts: _c10d.ReduceOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.ReduceOptions()
        t = _single(tensors, "reduce")
        comm, dev = self._first(t, "reduce tensor")
        root = self._peer(opts.rootRank, "reduce root")
        view, code, op, kw, scalar = self._reduction(opts, t, dev)
        ptr = view.data_ptr()  # in place; non-roots' tensors are left as they were
        nwork = self._run(comm, _REDUCE, code, view.numel(), ptr, ptr, op, root,
                          self._t.stream(dev), **kw)
        return self._finish(comm, nwork, tensors, (t, scalar), self._sync(opts))

    def reduce_scatter(self, output_tensors: _Tensors, input_tensors: list[_Tensors],
                       opts: _c10d.ReduceScatterOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.ReduceScatterOptions()
        out = _single(output_tensors, "reduce_scatter output")
        inputs = _single(input_tensors, "reduce_scatter input")
        comm, dev = self._first(out, "reduce_scatter output")
        self._same(inputs, out, "reduce_scatter input list", dev)
        # NCCL reads one flat input: made on the caller's stream, so it is ready in time
        flat = torch.cat([t.reshape(-1) for t in inputs])
        return self._reduce_scatter(comm, dev, out, flat, opts, output_tensors)

    def _reduce_scatter(self, comm: _Comm, dev: int, out: torch.Tensor, flat: torch.Tensor,
                        opts: _c10d.ReduceScatterOptions, result: _Tensors) -> _HalfWork:
        recv, code, op, kw, scalar = self._reduction(opts, out, dev)
        send = torch.view_as_real(flat) if flat.is_complex() else flat
        nwork = self._run(comm, _REDUCE_SCATTER, code, recv.numel(), send.data_ptr(),
                          recv.data_ptr(), op, 0, self._t.stream(dev), **kw)
        return self._finish(comm, nwork, result, (out, flat, scalar), self._sync(opts))

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: _c10d.ReduceScatterOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.ReduceScatterOptions()
        comm, dev = self._first(output, "reduce_scatter output")
        self._check(input, "reduce_scatter input", dev)
        self._world_times(input, output, "reduce_scatter", "input", "output")
        return self._reduce_scatter(comm, dev, output, input, opts, [output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs: _Tensors, inputs: _Tensors,
                                        opts: _c10d.ReduceScatterOptions | None = None
                                        ) -> _HalfWork:
        return self._coalesce(self.reduce_scatter_single, outputs, inputs, opts,
                              "reduce_scatter_tensor_coalesced")

    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced

    # -- data movement ----------------------------------------------------------
    def broadcast(self, tensors: _Tensors, opts: _c10d.BroadcastOptions | None = None
                  ) -> _HalfWork:
        if opts is None:
            opts = _c10d.BroadcastOptions()
        t = _single(tensors, "broadcast")
        comm, dev = self._first(t, "broadcast tensor")
        root = self._peer(opts.rootRank, "broadcast root")
        ptr = t.data_ptr()
        nwork = self._run(comm, _BROADCAST, _BYTES, t.nbytes, ptr, ptr, 0, root,
                          self._t.stream(dev))
        return self._finish(comm, nwork, tensors, (t,), self._sync(opts))

    def allgather(self, output_tensors: list[_Tensors], input_tensors: _Tensors,
                  opts: _c10d.AllgatherOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.AllgatherOptions()
        outs = _single(output_tensors, "allgather output")
        inp = _single(input_tensors, "allgather input")
        comm, dev = self._first(inp, "allgather input")
        self._same(outs, inp, "allgather output list", dev)
        # One broadcast from each rank straight into its output tensor: no flat
        # buffer, no copies after the collective.
        stream, n, src = self._t.stream(dev), inp.nbytes, inp.data_ptr()
        runs: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            ((_BROADCAST, _BYTES, n, src if q == self._rank else 0, o.data_ptr(), 0, q, stream),
             {}) for q, o in enumerate(outs)]
        return self._grouped(comm, runs, output_tensors, [inp] + list(outs), self._sync(opts))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
                          opts: _c10d.AllgatherOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.AllgatherOptions()
        comm, dev = self._first(input, "all_gather input")
        self._check(output, "all_gather output", dev)
        self._world_times(output, input, "all_gather", "output", "input")
        nwork = self._run(comm, _ALLGATHER, _BYTES, input.nbytes, input.data_ptr(),
                          output.data_ptr(), 0, 0, self._t.stream(dev))
        return self._finish(comm, nwork, [output], (input, output), self._sync(opts))

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(self, outputs: _Tensors, inputs: _Tensors,
                                        opts: _c10d.AllgatherOptions | None = None
                                        ) -> _HalfWork:
        return self._coalesce(self.all_gather_single, outputs, inputs, opts,
                              "allgather_into_tensor_coalesced")

    all_gather_single_coalesced = allgather_into_tensor_coalesced

    def _coalesce(self, one: Callable[[torch.Tensor, torch.Tensor, Any], _HalfWork],
                  outputs: _Tensors, inputs: _Tensors, opts: Any, what: str) -> _HalfWork:
        """The *_coalesced variants: each pair as one call, all in one NCCL group."""
        if len(outputs) != len(inputs):
            raise ValueError(f"fastspawn: {what} got {len(outputs)} outputs and {len(inputs)} "
                             "inputs")
        if not inputs:
            return self._done
        comm, _ = self._first(inputs[0], f"{what} input 0")
        # Inside the group each call enqueues without a work of its own (and so never
        # waits alone); the group's end gives the one work.
        try:
            comm.nccl.group_start()
        except Exception as e:  # noqa: BLE001
            raise _wrap(e) from None
        works = []
        try:
            for o, i in zip(outputs, inputs, strict=True):  # (lengths checked above)
                works.append(one(o, i, opts))
        finally:
            try:
                nwork = comm.nccl.group_end()
            except Exception as e:  # noqa: BLE001
                raise _wrap(e) from None
        if comm.pending is not None:  # an outer coalescing block launches them
            return works[-1]
        return self._finish(comm, nwork, list(outputs), list(outputs) + list(inputs),
                            self._sync(opts))

    def gather(self, output_tensors: list[_Tensors], input_tensors: _Tensors,
               opts: _c10d.GatherOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.GatherOptions()
        inp = _single(input_tensors, "gather input")
        comm, dev = self._first(inp, "gather input")
        root = self._peer(opts.rootRank, "gather root")
        stream, n = self._t.stream(dev), inp.nbytes
        runs: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            ((_SEND, _BYTES, n, inp.data_ptr(), 0, 0, root, stream), {})]
        keep = [inp]
        if root == self._rank:
            outs = _single(output_tensors, "gather output")
            self._same(outs, inp, "gather output list", dev)
            runs += [((_RECV, _BYTES, n, 0, o.data_ptr(), 0, q, stream), {})
                     for q, o in enumerate(outs)]
            keep += outs
        return self._grouped(comm, runs, output_tensors, keep, self._sync(opts))

    def scatter(self, output_tensors: _Tensors, input_tensors: list[_Tensors],
                opts: _c10d.ScatterOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.ScatterOptions()
        out = _single(output_tensors, "scatter output")
        comm, dev = self._first(out, "scatter output")
        root = self._peer(opts.rootRank, "scatter root")
        stream, n = self._t.stream(dev), out.nbytes
        runs: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
            ((_RECV, _BYTES, n, 0, out.data_ptr(), 0, root, stream), {})]
        keep = [out]
        if root == self._rank:
            ins = _single(input_tensors, "scatter input")
            self._same(ins, out, "scatter input list", dev)
            runs += [((_SEND, _BYTES, n, t.data_ptr(), 0, 0, q, stream), {})
                     for q, t in enumerate(ins)]
            keep += ins
        return self._grouped(comm, runs, output_tensors, keep, self._sync(opts))

    def alltoall(self, output_tensors: _Tensors, input_tensors: _Tensors,
                 opts: _c10d.AllToAllOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.AllToAllOptions()
        n = self._world
        if len(output_tensors) != n or len(input_tensors) != n:
            raise ValueError(f"fastspawn: alltoall needs {n} input and {n} output tensors")
        comm, dev = self._first(input_tensors[0], "alltoall input[0]")
        stream = self._t.stream(dev)
        runs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        for q, (o, i) in enumerate(zip(output_tensors, input_tensors, strict=True)):  # (both n)
            self._check(i, f"alltoall input[{q}]", dev)
            self._check(o, f"alltoall output[{q}]", dev)
            runs.append(((_SEND, _BYTES, i.nbytes, i.data_ptr(), 0, 0, q, stream), {}))
            runs.append(((_RECV, _BYTES, o.nbytes, 0, o.data_ptr(), 0, q, stream), {}))
        return self._grouped(comm, runs, output_tensors,
                             list(input_tensors) + list(output_tensors), self._sync(opts))

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: Sequence[int] | None,
                          input_split_sizes: Sequence[int] | None,
                          opts: _c10d.AllToAllOptions | None = None) -> _HalfWork:
        if opts is None:
            opts = _c10d.AllToAllOptions()
        n = self._world
        comm, dev = self._first(input, "all_to_all input")
        self._check(output, "all_to_all output", dev)
        stream = self._t.stream(dev)
        if not output_split_sizes and not input_split_sizes:
            if input.numel() % n or input.nbytes != output.nbytes:
                raise ValueError("fastspawn: all_to_all without splits needs equal input and "
                                 f"output sizes divisible by world_size {n}")
            nwork = self._run(comm, _ALLTOALL, _BYTES, input.nbytes // n, input.data_ptr(),
                              output.data_ptr(), 0, 0, stream)
        else:
            sc, sd = self._splits(input, input_split_sizes, "input")
            rc, rd = self._splits(output, output_split_sizes, "output")
            nwork = self._run(comm, _ALLTOALLV, _BYTES, 0, input.data_ptr(), output.data_ptr(),
                              0, 0, stream, send_counts=sc, send_displs=sd, recv_counts=rc,
                              recv_displs=rd)
        return self._finish(comm, nwork, [output], (input, output), self._sync(opts))

    alltoall_base = all_to_all_single

    def _splits(self, t: torch.Tensor, splits: Sequence[int] | None, what: str
                ) -> tuple[list[int], list[int]]:
        """Byte counts and displacements of t's blocks of rows, one per rank."""
        n = self._world
        rows = t.shape[0] if t.dim() else 0
        if not splits:
            if rows % n:
                raise ValueError(f"fastspawn: all_to_all {what} rows ({rows}) are not "
                                 f"divisible by {n}")
            splits = [rows // n] * n
        splits = list(splits)
        if len(splits) != n or sum(splits) != rows or min(splits) < 0:
            raise ValueError(f"fastspawn: all_to_all {what} split sizes {splits} do not match "
                             f"{n} ranks and {rows} rows")
        row = t.nbytes // rows if rows else 0
        counts = [s * row for s in splits]
        displs = [0] * n
        for q in range(1, n):
            displs[q] = displs[q - 1] + counts[q - 1]
        return counts, displs

    # send / recv are deferred (CudaComms.defer): queued with the caller's current stream
    # and issued together, as one NCCL group, when something needs them; dist.send /
    # dist.recv wait at once, so they (and whatever was queued before) go out at once.
    # Inside a coalescing block they are part of its group, as every collective.
    def send(self, tensors: _Tensors, dst: int, tag: int = 0) -> _HalfWork:
        t = _single(tensors, "send")
        comm, dev = self._first(t, "send tensor", p2p=True)
        if self._peer(dst, "send destination") == self._rank:
            raise ValueError("fastspawn: a rank cannot send to itself")
        args = (_SEND, _BYTES, t.nbytes, t.data_ptr(), 0, 0, dst, self._t.stream(dev))
        return self._send_recv(comm, args, tensors, t)

    def recv(self, tensors: _Tensors, src: int, tag: int = 0) -> _HalfWork:
        t = _single(tensors, "recv")
        comm, dev = self._first(t, "recv tensor", p2p=True)
        if self._peer(src, "recv source") == self._rank:
            raise ValueError("fastspawn: a rank cannot receive from itself")
        args = (_RECV, _BYTES, t.nbytes, 0, t.data_ptr(), 0, src, self._t.stream(dev))
        return self._send_recv(comm, args, tensors, t)

    def _send_recv(self, comm: _Comm, args: _RunArgs, tensors: _Tensors, t: torch.Tensor
                   ) -> _HalfWork:
        if comm.pending is None:
            return self.defer(comm, args, tensors, t)
        return self._finish(comm, self._run(comm, *args), tensors, (t,), False)

    def recv_anysource(self, tensors: _Tensors, tag: int = 0) -> _HalfWork:
        raise ValueError("fastspawn: NCCL cannot receive from any source: name the sending "
                         "rank (dist.recv(tensor, src=...))")

    def barrier(self, opts: _c10d.BarrierOptions | None = None) -> _HalfWork:
        dev = barrier_device(opts)
        dev = self._index(torch.device("cuda", dev) if dev is not None else "cuda")
        comm = self._comm_of(dev)
        nwork = self._run(comm, _BARRIER, 0, 0, 0, 0, 0, 0, self._t.stream(dev))
        # As ProcessGroupNCCL's: wait() also blocks the host until every rank is there.
        return self._finish(comm, nwork, [], (), False, barrier=True)

    # -- coalescing (torch's _coalescing_manager with a device) -----------------
    def _start_coalescing(self, device: torch.device | str) -> None:
        dev = self._index(device)
        comm = self._comm_of(dev)  # sends and receives queued before the block go first
        if comm.pending is not None:
            raise RuntimeError(f"fastspawn: coalescing already started on {self._t.name(dev)}")
        try:
            comm.nccl.group_start()
        except Exception as e:  # noqa: BLE001
            raise _wrap(e) from None
        comm.pending = []

    def _end_coalescing(self, device: torch.device | str) -> _HalfWork:
        dev = self._index(device)
        comm = self._comms.get(dev)
        if comm is None or comm.pending is None:
            raise RuntimeError("fastspawn: _end_coalescing without _start_coalescing on "
                               f"{self._t.name(dev)}")
        pending, comm.pending = comm.pending, None
        try:
            nwork = comm.nccl.group_end()
        except Exception as e:  # noqa: BLE001
            raise _wrap(e) from None
        if nwork is None:
            return self._done
        result = [t for w in pending for t in (w._result or [])]
        keep = [t for w in pending for t in w._keep]
        for w in pending:
            w._nwork, w._keep = nwork, ()
        return self._finish(comm, nwork, result, keep, False)
