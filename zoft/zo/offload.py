"""ZO2 offloading: transformer blocks live in CPU memory and stream through the compute device.

Paper: "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language Models with Limited GPU
Memory" (Wang et al., 2025), https://arxiv.org/abs/2503.12668. Only one or two blocks (the one
computing and the one being prefetched on a side CUDA stream) occupy GPU memory at a time;
embeddings, the final norm and the head stay resident. Because a ZO step has no backward pass, a
block is needed only during its forward, so GPU weight memory drops from the whole model to about
two blocks. The ZO update of step t is deferred (:class:`DeferredMeZOOptimizer`) and applied to
each block while it is resident for step t+1's first forward, so updating costs no extra transfer.
With the paired forward (:mod:`zoft.zo.paired`) both perturbed forwards run during one residency, so
each block is uploaded once per step, and with philox z the deferred update and both perturbed copies
are one pass over each weight. A bf16/fp16 model is streamed as it is stored: no fp32 copies, the update
is computed in fp32 on the resident block and rounded back stochastically (:mod:`zoft.zo.lowprec`).
Optionally blocks of an fp32 model are stored in bf16/fp16 and computed in fp32 (ZO2's AMP mode, with
the same seeded rounding), and under DistZO2 each rank uploads a slice of each block and the ranks
all-gather the rest (DistZO2's sliced uploads). Dirty blocks are written back on their own CUDA stream,
so the copy to host memory overlaps the next block's compute.

The hooks are generic: blocks are found as the largest ``nn.ModuleList`` of identical modules
(``model.model.layers``, ``transformer.h``, ``model.decoder.layers``, ...), with no per-model copy
of the forward code. On a CPU-only machine "offloading to the same device" runs the same code path
(real copies instead of transfers, no streams), which is what the CPU tests check bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from zoft.errors import ZoftError
from zoft.zo.lowprec import ROUNDINGS, STORAGE_DTYPES
from zoft.zo.mezo import MeZOOptimizer
from zoft.zo.perturb import ZOParameters


@dataclass
class OffloadConfig:
    """Settings of ZO2 offloading (the recipe's ``offload`` section, as plain values).

    Attributes:
        device: where blocks are stored between their forwards (``"cpu"``).
        compute_device: where blocks compute; default: CUDA when available, else CPU (the
            "offload to the same device" code path, used by the CPU tests).
        prefetch: upload block i+1 while block i computes (a side CUDA stream).
        pin_memory: pin the stored blocks (needed for truly asynchronous uploads); ``None``: when
            the compute device is CUDA.
        deferred_update: apply step t's update while each block is resident for step t+1.
        storage_dtype: ``"bfloat16"`` / ``"float16"``: store block parameters in that dtype and compute
            in their own (ZO2's AMP mode); ``None``: store them as they are.
        rounding: ``"stochastic"`` or ``"nearest"``: how updated parameters are rounded to ``storage_dtype``.
        sliced_upload: ``"auto"``, ``True`` or ``False``: each rank uploads a slice of each block and the
            ranks all-gather the rest; auto: when ``torch.distributed`` runs more than one process.
    """

    device: str = "cpu"
    compute_device: str | None = None
    prefetch: bool = True
    pin_memory: bool | None = None
    deferred_update: bool = True
    storage_dtype: str | None = None
    rounding: str = "stochastic"
    sliced_upload: bool | str = "auto"


def find_transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the ``nn.ModuleList`` of same-class modules holding
    the most parameters.

    Args:
        model: a Hugging Face model (optionally wrapped by peft).

    Returns:
        ``(qualified name, module list)``, e.g. ``("model.layers", ...)`` for Llama.

    Raises:
        ZoftError: no module list of at least two identical modules exists.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None or best[0] == 0:
        raise ZoftError(
            f"offload: found no list of transformer blocks in {type(model).__name__}; "
            "offloading needs a model whose layers are an nn.ModuleList (Llama, Qwen, OPT, GPT-2 families)"
        )
    return best[1], best[2]


def _cuda_stream(device: torch.device):
    return torch.cuda.Stream(device=device) if device.type == "cuda" else None


class BlockOffloader:
    """Keeps a model's transformer blocks in storage memory and streams them to the compute device.

    A forward pre-hook on block i makes it resident (waiting for its prefetch if one is under way)
    and starts uploading block i+1 (i+1 = 0 after the last block, for the next forward) on a side
    stream; a forward hook sends block i back. Stored values are written back only when they were
    changed while resident (:meth:`mark_dirty`), so a block that was only read costs one upload; the
    write-back runs on a third CUDA stream (after the compute that produced the values), overlapping the
    next block's compute, and the next upload of that block waits for it.

    Low-precision storage (``storage_dtype``, ZO2's AMP mode): the blocks' floating-point parameters
    are stored in bf16/fp16 (rounded to nearest once, here) and cast back to their own dtype on the
    compute device after each upload, so forwards, perturbations and updates run in the model's
    dtype on the resident copy. The update rounds each updated value to the storage dtype on the
    resident copy (:meth:`ZOParameters.round_to_storage`, seeded, :mod:`zoft.zo.lowprec`), so the
    forwards that follow and the stored copy see the same values and the write-back is exact. Buffers
    (rotary tables, masks) keep their dtype: they are small and some lose their meaning in 16 bits.

    Sliced uploads (``sliced``, DistZO2's hardware-aware scheme): the ranks of ``group`` (one node's
    ranks) each copy only their 1/size slice of a block's stored tensors (flattened and concatenated
    per storage dtype) to the compute device, and ``all_gather_into_tensor`` (``all_gather`` where the
    backend lacks it) assembles the whole block on every rank over the device interconnect. Each
    rank's host-to-device bytes drop to 1/size. Every upload is then a collective, so every rank must
    upload the same blocks in the same order: uploads happen only in block hooks (block i, then the
    prefetch of i+1, wrapping to 0 after the last block) and in :meth:`resident` (flushes, in block
    order), so ranks that run the same forwards and flushes, with the same ``prefetch``, issue
    identical sequences; the layout and ``prefetch`` are compared across ranks at construction. A
    forward run on some ranks only (e.g. generation on rank 0) would hang the others. Every rank
    writes the whole updated block back to its own stored copy: each process holds a private full
    copy, and all ranks hold identical values after the update (docs/multi_gpu.md discusses the
    alternatives).

    Args:
        model: the model; its blocks are found by :func:`find_transformer_blocks`.
        compute_device: where blocks run; the rest of the model is moved there.
        storage_device: where blocks live between forwards.
        prefetch: overlap the upload of the next block with the current block's compute.
        pin_memory: pin stored tensors (``None``: when computing on CUDA).
        storage_dtype: ``torch.bfloat16`` / ``torch.float16`` to store block parameters in (those
            wider than it); ``None``: store them in their own dtype.
        rounding: ``"stochastic"`` (default) or ``"nearest"``: how updated values of parameters stored in
            ``storage_dtype`` are rounded to it (applied by :class:`DeferredMeZOOptimizer`'s updates).
        sliced: upload 1/size of each block per rank and all-gather (needs an initialized process group).
        group: the ``torch.distributed`` group sharing the uploads (``None``: the default group); with
            one member, slicing is off.

    Raises:
        ZoftError: no block list; float16 storage of weights beyond float16's range; ranks whose
            blocks or prefetch setting differ (sliced).
    """

    def __init__(
        self,
        model: nn.Module,
        compute_device: torch.device | str,
        storage_device: torch.device | str = "cpu",
        *,
        prefetch: bool = True,
        pin_memory: bool | None = None,
        storage_dtype: torch.dtype | None = None,
        rounding: str = "stochastic",
        sliced: bool = False,
        group=None,
    ) -> None:
        if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"storage_dtype must be torch.bfloat16 or torch.float16, got {storage_dtype}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
        self.model = model
        self.device = torch.device(compute_device)
        self.storage_device = torch.device(storage_device)
        self.prefetch = prefetch
        self.storage_dtype = storage_dtype
        self.rounding = rounding
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        if pin and not torch.cuda.is_available():
            pin = False  # pinning needs a CUDA driver; without one the copies are synchronous anyway
        self.pin_memory = pin
        self.blocks_name, block_list = find_transformer_blocks(model)
        self.blocks: list[nn.Module] = list(block_list)
        self._side_stream = _cuda_stream(self.device)
        self._writeback_stream = _cuda_stream(self.device)
        # Per block: [(owner module, "_parameters" | "_buffers", attr, stored tensor, compute dtype)].
        self._stored: list[list[tuple[nn.Module, str, str, torch.Tensor, torch.dtype]]] = []
        self._resident: dict[int, list[torch.Tensor]] = {}
        self._ready_event: dict[int, object] = {}
        self._writeback_event: dict[int, object] = {}
        self._active: set[int] = set()
        self._dirty: set[int] = set()
        self.block_of_param: dict[int, int] = {}
        self._low: set[int] = set()  # ids of parameters stored in storage_dtype
        self.uploads = 0  # block uploads (cost accounting for tests and benchmarks)
        self.uploaded_bytes = 0  # bytes this process copied from storage to the compute device
        self.writebacks = 0
        self._place(model)
        self.group = group
        self.slice_world, self.slice_rank = (dist.get_world_size(group), dist.get_rank(group)) if sliced else (1, 0)
        self.sliced = self.slice_world > 1
        # all_gather_into_tensor: one contiguous output, what NCCL does best; None: not tried yet.
        self.gather_into_tensor: bool | None = None
        if self.sliced:
            self._slices = [self._slice_layout(entries) for entries in self._stored]
            self._check_layout()
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._before_block(i)))
            self._handles.append(block.register_forward_hook(lambda m, a, o, i=i: self._after_block(i)))

    # -- placement --------------------------------------------------------------------------------

    def _lowered(self, kind: str, t: torch.Tensor) -> bool:
        """Whether this block tensor is stored in ``storage_dtype``: floating parameters wider than it."""
        return (
            self.storage_dtype is not None
            and kind == "_parameters"
            and t.is_floating_point()
            and t.element_size() > torch.empty((), dtype=self.storage_dtype).element_size()
        )

    def _place(self, model: nn.Module) -> None:
        in_blocks = {id(m) for block in self.blocks for m in block.modules()}
        for i, block in enumerate(self.blocks):
            entries = []
            for module in block.modules():
                for kind in ("_parameters", "_buffers"):
                    for attr, t in getattr(module, kind).items():
                        if t is None:
                            continue
                        data = t.data if kind == "_parameters" else t
                        low = self._lowered(kind, data)
                        dtype = self.storage_dtype if low else data.dtype
                        stored = data.to(device=self.storage_device, dtype=dtype).contiguous()
                        if low and dtype == torch.float16 and not bool(torch.isfinite(stored).all()):
                            if bool(torch.isfinite(data).all()):
                                raise ZoftError(
                                    f"offload.storage_dtype: float16 cannot hold block {i}'s weights (largest "
                                    f"|value| {data.abs().max().item():.4g}, float16's largest is 65504); use bfloat16"
                                )
                        if self.pin_memory and not stored.is_pinned():
                            stored = stored.pin_memory()
                        self._set(module, kind, attr, stored)
                        entries.append((module, kind, attr, stored, data.dtype))
                        if kind == "_parameters":
                            self.block_of_param[id(t)] = i
                            if low:
                                self._low.add(id(t))
            self._stored.append(entries)
        for module in model.modules():
            if id(module) in in_blocks:
                continue
            for kind in ("_parameters", "_buffers"):
                for attr, t in getattr(module, kind).items():
                    if t is not None and t.device != self.device:
                        self._set(module, kind, attr, t.data.to(self.device) if kind == "_parameters" else t.to(self.device))
        if self.device != self.storage_device:
            # HF Trainer skips moving a model that has a device map, and accelerate one whose map has
            # two entries; "cpu" is not used as a value so save_pretrained does not treat the model as
            # accelerate-offloaded (whose weights would be on the meta device).
            model.hf_device_map = {"": str(self.device), self.blocks_name: "zoft-offload"}
        model.zoft_offloader = self

    @staticmethod
    def _set(module: nn.Module, kind: str, attr: str, tensor: torch.Tensor) -> None:
        if kind == "_parameters":
            module._parameters[attr].data = tensor
        else:
            module._buffers[attr] = tensor

    @staticmethod
    def _slice_layout(entries) -> list[tuple[torch.dtype, list[tuple[int, int]], int]]:
        """Per storage dtype: (dtype, [(entry index, offset in the concatenation)], total elements)."""
        groups: dict[torch.dtype, tuple[list[tuple[int, int]], list[int]]] = {}
        for k, e in enumerate(entries):
            members, total = groups.setdefault(e[3].dtype, ([], [0]))
            members.append((k, total[0]))
            total[0] += e[3].numel()
        return [(dtype, members, total[0]) for dtype, (members, total) in groups.items()]

    def _check_layout(self) -> None:
        """Refuse ranks whose uploads would not pair up: their collectives would hang or mix blocks."""
        sizes = [total for layout in self._slices for _, _, total in layout]
        mine = torch.tensor(
            [len(self.blocks), int(self.prefetch), len(sizes), sum(sizes), sum((k + 1) * n for k, n in enumerate(sizes))],
            dtype=torch.int64,
            device=self.device,
        )
        everyone = [torch.empty_like(mine) for _ in range(self.slice_world)]
        dist.all_gather(everyone, mine, group=self.group)
        if any(not torch.equal(mine, other) for other in everyone):
            raise ZoftError(
                "offload: the ranks' transformer blocks or offload.prefetch differ, so their sliced uploads cannot "
                "pair up; every rank must load the same model with the same recipe"
            )

    @property
    def stored_bytes(self) -> int:
        """Bytes the stored blocks occupy in storage memory."""
        return sum(e[3].nbytes for entries in self._stored for e in entries)

    # -- streaming ----------------------------------------------------------------------------------

    def _copy_block(self, i: int) -> list[torch.Tensor]:
        """Block i's stored tensors, copied as they are (storage dtype) to the compute device."""
        # A real copy even to the same device: the CPU tests then exercise the write-back logic.
        staged = [
            torch.empty(e[3].shape, dtype=e[3].dtype, device=self.device).copy_(e[3], non_blocking=True)
            for e in self._stored[i]
        ]
        self.uploaded_bytes += sum(t.nbytes for t in staged)
        return staged

    def _gather_block(self, i: int) -> list[torch.Tensor]:
        """Block i on the compute device (storage dtype): this rank uploads its slice, the group all-gathers."""
        entries = self._stored[i]
        out: list[torch.Tensor | None] = [None] * len(entries)
        for dtype, members, total in self._slices[i]:
            chunk = -(-total // self.slice_world)  # the last slice is padded to this length
            start = self.slice_rank * chunk
            end = min(start + chunk, total)
            mine = torch.empty(chunk, dtype=dtype, device=self.device)
            mine[max(end - start, 0) :].zero_()  # padding: sent, never read
            for k, offset in members:
                flat = entries[k][3].view(-1)
                a, b = max(offset, start), min(offset + flat.numel(), end)
                if a < b:
                    mine[a - start : b - start].copy_(flat[a - offset : b - offset], non_blocking=True)
            self.uploaded_bytes += max(end - start, 0) * mine.element_size()
            full = torch.empty(chunk * self.slice_world, dtype=dtype, device=self.device)
            self._all_gather(full, mine)
            for k, offset in members:
                shape = entries[k][3].shape
                out[k] = full[offset : offset + entries[k][3].numel()].view(shape)
        return out

    def _all_gather(self, full: torch.Tensor, mine: torch.Tensor) -> None:
        if self.gather_into_tensor is not False:
            try:
                dist.all_gather_into_tensor(full, mine, group=self.group)
                self.gather_into_tensor = True
                return
            except (RuntimeError, NotImplementedError):
                # Backends without it (gloo before torch 2.x) refuse locally, before communicating, and
                # identically on every rank: all of them fall back here.
                if self.gather_into_tensor:
                    raise
                self.gather_into_tensor = False
        dist.all_gather(list(full.chunk(self.slice_world)), mine, group=self.group)

    def _upload(self, i: int, stream) -> None:
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            if stream is not None and i in self._writeback_event:
                stream.wait_event(self._writeback_event.pop(i))  # its stored copy is still being written
            # On the side stream the collective is ordered after this stream's copies and before its event.
            staged = self._gather_block(i) if self.sliced else self._copy_block(i)
            # Cast after the transfer, on the compute device: a cross-device copy_ that also changes the
            # dtype converts on the host and would move the wide dtype's bytes.
            copies = [t if t.dtype == e[4] else t.to(e[4]) for t, e in zip(staged, self._stored[i])]
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                self._ready_event[i] = event
        self._resident[i] = copies
        self.uploads += 1

    def _activate(self, i: int) -> None:
        if i not in self._resident:
            self._upload(i, None if self._side_stream is None else torch.cuda.current_stream(self.device))
        event = self._ready_event.pop(i, None)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in self._resident[i]:
                t.record_stream(current)  # allocated on the side stream, used on this one
        for (module, kind, attr, _, _), t in zip(self._stored[i], self._resident[i]):
            self._set(module, kind, attr, t)
        self._active.add(i)

    def _deactivate(self, i: int) -> None:
        if i in self._dirty:
            # Sliced or not, the whole block: this process's stored copy is private and complete (it is what
            # save, checksum and the next upload read), and every rank holds the same updated values.
            stream = self._writeback_stream
            if stream is not None:
                # After the compute that wrote the values; then off the compute stream, so the next block's
                # forward does not wait for the copy to host memory.
                stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for (module, kind, attr, stored, _), resident in zip(self._stored[i], self._resident[i]):
                    if kind == "_parameters":
                        value = module._parameters[attr].data
                        # Narrowed on the compute device, for the same reason as in _upload. Updates of values
                        # stored in 16 bits are rounded to it, so this cast is exact.
                        stored.copy_(value if value.dtype == stored.dtype else value.to(stored.dtype), non_blocking=True)
                        if stream is not None:
                            resident.record_stream(stream)  # not reused before the copy is done
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
                    self._writeback_event[i] = event
            self._dirty.discard(i)
            self.writebacks += 1
        for module, kind, attr, stored, _ in self._stored[i]:
            self._set(module, kind, attr, stored)
        del self._resident[i]
        self._active.discard(i)

    def _before_block(self, i: int) -> None:
        if i not in self._active:
            self._activate(i)
        nxt = (i + 1) % len(self.blocks)
        if self.prefetch and nxt not in self._resident and nxt not in self._active:
            self._upload(nxt, self._side_stream)

    def _after_block(self, i: int) -> None:
        if i in self._active:
            self._deactivate(i)

    # -- for the update path ------------------------------------------------------------------------

    def block_index(self, param: torch.Tensor) -> int | None:
        """The index of the block holding ``param``, or ``None`` for a resident parameter."""
        return self.block_of_param.get(id(param))

    def stores_low_precision(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is stored in ``storage_dtype`` (and computed in a wider dtype)."""
        return id(param) in self._low

    def _require_active(self, param: torch.Tensor, what: str) -> int | None:
        i = self.block_of_param.get(id(param))
        if i is not None and i not in self._active:
            raise RuntimeError(f"offload: block {i} was {what} while not resident")
        return i

    def mark_dirty(self, params) -> None:
        """Record that these parameters were changed while resident (written back on release)."""
        for p in params:
            i = self._require_active(p, "changed")
            if i is not None:
                self._dirty.add(i)

    def trajectory_info(self, zo: ZOParameters) -> dict:
        """What ``zoft replay`` needs to reproduce the storage rounding (empty without ``storage_dtype``)."""
        if self.storage_dtype is None:
            return {}
        dtype = str(self.storage_dtype).removeprefix("torch.")
        rounded = sorted(n for n, p in zo.params.items() if id(p) in self._low)
        return {"storage": {"dtype": dtype, "rounding": self.rounding, "rounded": rounded}}

    @contextlib.contextmanager
    def resident(self, i: int) -> Iterator[None]:
        """Make block ``i`` resident for the duration of the context (e.g. to flush an update)."""
        was_active = i in self._active
        if not was_active:
            self._activate(i)
        try:
            yield
        finally:
            if not was_active:
                self._deactivate(i)

    def synchronize(self) -> None:
        """Wait for outstanding copies, so stored tensors can be read on the host (save, checksum)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._writeback_event.clear()

    def drop_prefetched(self) -> None:
        """Forget prefetched copies (call after changing stored values outside the update path)."""
        for i in [i for i in self._resident if i not in self._active]:
            del self._resident[i]
            self._ready_event.pop(i, None)

    def remove(self) -> None:
        """Remove the hooks and leave every block on the storage device."""
        for h in self._handles:
            h.remove()
        self.drop_prefetched()
        for i in list(self._active):
            self._deactivate(i)
        self.synchronize()


def round_blocks_to_storage_(model: nn.Module, storage_dtype: torch.dtype) -> list[str]:
    """Round, in place, the parameters that :class:`BlockOffloader` would store in ``storage_dtype``
    to the values it stores (round to nearest); they keep their dtype. Returns their names.

    ``zoft replay`` starts from this, as the offloaded run started from its stored blocks.
    """
    _, blocks = find_transformer_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    width = torch.empty((), dtype=storage_dtype).element_size()
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in in_blocks and p.is_floating_point() and p.element_size() > width:
                p.data.copy_(p.data.to(storage_dtype))
                names.append(name)
    return names


def check_cpu_memory(needed_bytes: int, available_bytes: int, processes: int = 1, masters_bytes: int = 0) -> None:
    """Refuse to offload a model whose stored blocks do not fit in CPU memory.

    Args:
        needed_bytes: one process's copy of the model (it is loaded whole, then its blocks stay in CPU memory).
        available_bytes: the machine's available memory.
        processes: processes of the launch on this machine; each keeps its own copy (DistZO2 ranks do
            not share host memory).
        masters_bytes: one process's fp32 masters (``method.master_weights: fp32`` on a bf16/fp16 model: they
            stay in CPU memory with the blocks); 0 by default, where nothing beyond the weights is kept.

    Raises:
        ZoftError: one line with the memory needed and available.
    """
    one = needed_bytes + masters_bytes
    if one * processes > available_bytes:
        gib = 1024**3
        split = f" ({needed_bytes / gib:.1f} GiB weights + {masters_bytes / gib:.1f} GiB fp32 masters)" if masters_bytes else ""
        if processes == 1:
            need = f"the model needs about {one / gib:.1f} GiB{split} of CPU memory"
            fixes = "use model.dtype: bfloat16, a machine with more memory, or a smaller model"
        else:
            need = (
                f"the {processes} processes on this machine each keep the model in CPU memory: about "
                f"{processes} x {one / gib:.1f}{split} = {one * processes / gib:.1f} GiB"
            )
            fixes = "use fewer processes per machine, model.dtype: bfloat16, a machine with more memory, or a smaller model"
        if masters_bytes:
            fixes = "use method.master_weights: auto (no fp32 copies), " + fixes.removeprefix("use ").replace(
                "model.dtype: bfloat16, ", "")
        elif processes == 1:
            need += " for its weights"
        raise ZoftError(f"offload: {need}, only {available_bytes / gib:.1f} GiB is available; {fixes}")


def node_group(environ: Mapping[str, str] | None = None):
    """The process group of this node's ranks, to share block uploads over the node's device links.

    Every node has its own host memory and host-to-device links, and its devices are connected to
    each other much faster than to other nodes: each node's ranks split the uploads among themselves
    and all-gather within the node. ``None`` (the default group) when all ranks are on one node, or
    when the launcher's ``LOCAL_WORLD_SIZE`` does not divide the world (nodes of unequal size). A
    collective: every rank calls it.
    """
    env = os.environ if environ is None else environ
    world = dist.get_world_size()
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    if local >= world or world % local:
        return None
    group, _ = dist.new_subgroups(group_size=local)  # torchrun numbers a node's ranks contiguously
    return group


def attach_offload(model: nn.Module, config: OffloadConfig) -> BlockOffloader:
    """Offload ``model``'s transformer blocks as ``config`` says; returns the offloader.

    Raises:
        ZoftError: the compute device is CUDA but none is available; ``sliced_upload`` true in a single
            process; or no block list is found.
    """
    compute = config.compute_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(compute).type == "cuda" and not torch.cuda.is_available():
        raise ZoftError("offload.compute_device: CUDA is not available here; drop the key to compute on CPU")
    storage = STORAGE_DTYPES[config.storage_dtype] if config.storage_dtype is not None else None
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    sliced = world > 1 if config.sliced_upload == "auto" else bool(config.sliced_upload)
    if sliced and world == 1:
        raise ZoftError(
            "offload.sliced_upload: true needs several processes sharing the uploads, but this run has 1; "
            "launch it with torchrun --nproc_per_node N, or set sliced_upload: auto"
        )
    return BlockOffloader(
        model,
        compute,
        config.device,
        prefetch=config.prefetch,
        pin_memory=config.pin_memory,
        storage_dtype=storage,
        rounding=config.rounding,
        sliced=sliced,
        group=node_group() if sliced else None,
    )


class DeferredMeZOOptimizer(MeZOOptimizer):
    """MeZO whose update of step t is applied lazily, module by module, at its next forward.

    ``step()`` records the update (and logs it, with the exact numbers, like :class:`MeZOOptimizer`);
    a forward pre-hook on each module owning trained parameters applies that module's share before
    anything else reads it (before the perturbation of step t+1 swaps in ``theta + eps z``). With an
    offloader this happens while the block is resident, so the update needs no transfer of its own.
    :meth:`flush` applies whatever is left (before evaluation, save, and the next step's update); the
    arithmetic is :meth:`ZOParameters.apply_update`'s, so the weights equal eager MeZO's exactly.
    With low-precision storage each updated block parameter is rounded to the storage dtype by the update
    itself (:meth:`ZOParameters.round_to_storage`): the weights equal eager MeZO's with that rounding.

    Fusion: when the forward that finds a parameter's update pending is a perturbed one (two-forward or
    paired), the update is handed to the perturbation's swap-in (``zo.pending_update``) instead of being
    applied by this optimizer's hook, so with the philox z generator the weights are read and written
    once for the update of step t and the first perturbation of step t+1 (``fused_update_perturb``; under
    the paired forward both perturbed copies come from that one pass), not twice.

    Args:
        zo, lr, weight_decay, n_directions, on_update, clip: as for :class:`MeZOOptimizer`.
        offloader: the :class:`BlockOffloader` of the model, or ``None``.
        fuse: hand pending updates to perturbed forwards (default); ``False`` applies them in this
            optimizer's pre-hook, a separate pass (the unfused reference the tests compare against).
    """

    def __init__(
        self,
        zo: ZOParameters,
        lr: float,
        weight_decay: float = 0.0,
        n_directions: int = 1,
        on_update: Callable[[dict], None] | None = None,
        offloader: BlockOffloader | None = None,
        clip: float | None = None,
        fuse: bool = True,
    ) -> None:
        super().__init__(zo, lr, weight_decay, n_directions, on_update, clip)
        self.offloader = offloader
        self.fuse = fuse
        if offloader is not None and offloader.storage_dtype is not None:
            # A parameter stored in bf16/fp16 but computed in fp32: the update runs in fp32 on the resident
            # copy and is rounded to the storage dtype before anything reads it (in the fused kernel too),
            # so the forwards and the written-back copy see the same values. No fp32 master.
            for name, p in zo.params.items():
                if offloader.stores_low_precision(p):
                    zo.round_to_storage(name, offloader.storage_dtype, offloader.rounding)
        self._deferred: tuple[int, list[tuple[int, float]], float, float] | None = None
        self._unapplied: set[str] = set()
        self.applied_in_forward = 0  # parameters updated by a forward hook (not by flush)
        if self.fuse:
            zo.pending_update = self._take
        self._handles = []
        for module, owned in zo._owners:
            names = [name for _, name in owned]
            self._handles.append(module.register_forward_pre_hook(lambda m, a, names=names: self._apply(names, True)))

    @torch.no_grad()
    def _apply(self, names: list[str], in_forward: bool = False) -> None:
        if in_forward and self.fuse and self.zo.perturbing:
            return  # the perturbation's swap-in, a later pre-hook, takes the update (_take) and fuses it
        todo = [n for n in names if n in self._unapplied]
        if not todo:
            return
        step, coefficients, lr, wd = self._deferred
        self.zo.apply_update(step, coefficients, lr, wd, names=todo)
        self._mark_applied(todo, in_forward)

    def _mark_applied(self, names: list[str], in_forward: bool) -> None:
        self._unapplied.difference_update(names)
        if self.offloader is not None:
            self.offloader.mark_dirty(self.zo.params[n] for n in names)
        if in_forward:
            self.applied_in_forward += len(names)
        if not self._unapplied:
            self._deferred = None

    def _take(self, name: str) -> tuple[int, list[tuple[int, float]], float, float] | None:
        """The pending update of ``name`` for the caller to apply now (``ZOParameters.pending_update``)."""
        if name not in self._unapplied:
            return None
        update = self._deferred
        self._mark_applied([name], True)
        return update

    def _commit_update(self, step: int, coefficients: list[tuple[int, float]], lr: float, wd: float) -> None:
        self.flush()  # a parameter no forward touched still holds the previous update
        self._deferred = (step, coefficients, lr, wd)
        self._unapplied = set(self.zo.params)

    @property
    def has_deferred(self) -> bool:
        return bool(self._unapplied)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the deferred update to every parameter that has not received it yet."""
        if self._unapplied:
            by_block: dict[int | None, list[str]] = {}
            for name in sorted(self._unapplied):
                block = self.offloader.block_index(self.zo.params[name]) if self.offloader else None
                by_block.setdefault(block, []).append(name)
            for block, names in by_block.items():
                # z is sampled on the parameter's device: update offloaded blocks where they compute,
                # as their perturbations are, so both see the same z.
                ctx = self.offloader.resident(block) if block is not None else contextlib.nullcontext()
                with ctx:
                    self._apply(names)
        if self.offloader is not None:
            self.offloader.synchronize()

    def state_dict(self):
        self.flush()
        return super().state_dict()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        if self.zo.pending_update == self._take:
            self.zo.pending_update = None
