"""Per-step memory of ``bench_overhead.py``'s workers: live-tensor bytes, peak RSS, CUDA peak.

Three figures per optimizer step:

* **allocator** (every device, deterministic): bytes of the live tensors the step needs, each
  storage counted once — parameters and buffers of the whole model (the frozen base included),
  gradients, optimizer state (AdamW: ``exp_avg``, ``exp_avg_sq`` and the ``step`` scalar per
  tensor), the activations autograd saved for backward during the step's forward (packed through
  :func:`torch.autograd.graph.saved_tensors_hooks`; a saved parameter is not counted twice) and
  ``extra`` (the allocation method's own buffers: adarank's gradient capture as held after the
  backward — sketches and sampled input rows, minus the rows that are views of a saved
  activation — and its controller state; PEFT AdaLoRA's importance buffers). It is the sum of
  what the step holds at its fullest, an upper bound of the true simultaneous peak (backward
  frees saved activations while gradients appear) and it leaves out temporaries (matmul outputs
  freed within an op, ``observe()``'s copy of the sampled rows once the activations are freed,
  allocator caching/fragmentation, the batch itself);
* **RSS**: the process's peak resident memory during the step (Linux ``VmHWM``, reset before the
  step by writing ``5`` to ``/proc/self/clear_refs``; where that is refused, ``VmRSS`` sampled
  after forward, backward and optimizer step);
* **CUDA**: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` per step.

Phases follow the budget schedule's allocation steps (:func:`phase_of`).
"""

from __future__ import annotations

import resource
import weakref
from collections.abc import Iterable
from contextlib import contextmanager

import torch

PHASES = ("warmup", "decay", "final")
PARTS = ("params", "grads", "optimizer", "saved", "extra")


def phase_of(step: int, first_alloc: int, final_alloc: int) -> str:
    """``warmup`` before the first allocation step, ``final`` after the final one, else ``decay``.

    The allocation steps themselves are in ``decay``: their forward runs at the old ranks and
    their capture transient belongs to the re-allocation.
    """
    if step < first_alloc:
        return "warmup"
    return "final" if step > final_alloc else "decay"


def phase_bounds(controller, lora_params: int, steps: int, warm: int, final: int, interval: int):
    """(first, final) allocation step of the controller's schedule (the same schedule for the
    configurations without one, so every configuration is split at the same steps)."""
    from adarank.allocation import BudgetSchedule

    sched = controller.schedule if controller is not None else None
    if sched is None:
        sched = BudgetSchedule(
            lora_params, steps, warmup_steps=warm, final_steps=final, interval=interval
        )
    return min(s for s in sched.allocation_steps() if s >= 1), sched.final_start


def _storage(t: torch.Tensor) -> tuple[tuple, int]:
    """(key, bytes) of the storage behind ``t`` (a view counts its whole storage)."""
    try:
        st = t.untyped_storage()
        return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (subclasses)
        return ("id", id(t)), t.numel() * t.element_size()


def unique_bytes(tensors: Iterable[torch.Tensor], seen: dict) -> int:
    """Bytes of the storages of ``tensors`` not in ``seen`` (which is updated)."""
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key, nbytes = _storage(t)
        if key not in seen:
            seen[key] = nbytes
            total += nbytes
    return total


class StepMemory:
    """Counts one step's live-tensor bytes; ``saving()`` wraps the forward (and any loss term).

    Example::

        mem = StepMemory()
        with mem.saving():
            loss = model(x).loss
        loss.backward(); opt.step()
        parts = mem.measure(model, opt, extra=0)   # bytes per part and "total"
    """

    def __init__(self) -> None:
        self._saved: dict = {}
        self._refs: dict = {}
        self._held = 0

    @contextmanager
    def saving(self):
        """Record the storages autograd saves for backward inside this block (new step)."""
        self._saved, self._refs, self._held = {}, {}, 0

        def pack(t: torch.Tensor) -> torch.Tensor:  # keys and weak references: nothing kept alive
            key, nbytes = _storage(t)
            if key not in self._saved:
                self._saved[key] = nbytes
                try:
                    self._refs[key] = weakref.ref(t.untyped_storage())
                except (RuntimeError, NotImplementedError, TypeError):
                    pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def hold(self, tensors: Iterable[torch.Tensor]) -> int:
        """Add the method's buffers held now (after the backward) to ``extra``: each storage
        once, none that is a saved activation still alive (a view of it costs nothing more)."""
        seen: dict = {}
        for t in tensors:
            key, nbytes = _storage(t)
            ref = self._refs.get(key)
            if key in seen or (ref is not None and ref() is t.untyped_storage()):
                continue
            seen[key] = nbytes
        self._held += sum(seen.values())
        return self._held

    def measure(self, model: torch.nn.Module, opt: torch.optim.Optimizer, extra: int = 0) -> dict:
        """Bytes per part (:data:`PARTS`), ``total`` and ``trainable`` (params+grads+optimizer
        state of the trainable parameters only). Call after ``optimizer.step()`` and before
        ``zero_grad()``."""
        seen: dict = {}
        tensors = list(model.parameters()) + list(model.buffers())
        trainable = [p for p in model.parameters() if p.requires_grad]
        out = {"params": unique_bytes(tensors, seen)}
        out["grads"] = unique_bytes((p.grad for p in trainable if p.grad is not None), seen)
        state = [v for s in opt.state.values() for v in s.values()]
        out["optimizer"] = unique_bytes(state, seen)
        # saved activations are compared with the parameters' storages only: they were packed
        # while those were alive, whereas a freed activation's address may since be reused
        params = {k for t in tensors for k in [_storage(t)[0]]}
        out["saved"] = sum(n for k, n in self._saved.items() if k not in params)
        out["extra"] = int(extra) + self._held
        out["total"] = sum(out[k] for k in PARTS)
        own: dict = {}
        out["trainable"] = (
            unique_bytes(trainable, own)
            + unique_bytes((p.grad for p in trainable if p.grad is not None), own)
            + unique_bytes((v for p in trainable for v in opt.state.get(p, {}).values()), own)
        )
        self._saved, self._refs, self._held = {}, {}, 0
        return out


class PeakRSS:
    """Peak resident memory per step: ``VmHWM`` reset per step, else sampled ``VmRSS``."""

    def __init__(self) -> None:
        self.method = "vmhwm" if self._reset() else "vmrss-sampled"
        self._peak = 0

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
        return 0

    def start(self) -> None:
        """Begin a step (resets the kernel's high-water mark when permitted)."""
        if self.method == "vmhwm":
            self._reset()
        self._peak = self._status("VmRSS")

    def sample(self) -> None:
        """A mid-step sample (only used by the fallback)."""
        if self.method != "vmhwm":
            self._peak = max(self._peak, self._status("VmRSS"))

    def stop(self) -> int:
        """Peak bytes of the step."""
        if self.method == "vmhwm":
            return self._status("VmHWM")
        self.sample()
        return self._peak


class CudaPeak:
    """``max_memory_allocated`` per step; every method is a no-op off CUDA."""

    def __init__(self, device: str) -> None:
        self.on = device.startswith("cuda")

    def start(self) -> None:
        if self.on:
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self.on else None


def capture_tensors(capture) -> list[torch.Tensor]:
    """The tensors held by a layer's gradient capture (every ``captured_*`` tensor or list)."""
    out = []
    for key, value in vars(capture).items():
        if key.startswith("captured_"):
            vals = value if isinstance(value, (list, tuple)) else [value]
            out += [t for t in vals if isinstance(t, torch.Tensor)]
    return out


def rss_bytes() -> int:
    """Peak RSS of the whole process so far (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class MemoryRecorder:
    """The three per-step figures of a training loop, and the record fields they become.

    Per step: ``start()``; the forward (and any loss term) inside ``saving()``; ``sample()``
    after the backward; ``measure(model, opt, extra)`` after ``optimizer.step()``; ``stop(state)``
    at the end of the step (``state``: the method's persistent buffers after its allocation).
    """

    def __init__(self, device: str, bounds: tuple[int, int]) -> None:
        self.pre_peak = rss_bytes()  # the peak before training (model construction)
        self.bounds = bounds
        self.mem, self.rss, self.cuda = StepMemory(), PeakRSS(), CudaPeak(device)
        self.memory: dict[str, list[int]] = {k: [] for k in (*PARTS, "total", "trainable")}
        self.rss_steps: list[int] = []
        self.cuda_steps: list[int | None] = []
        self._parts: dict = {}

    def start(self) -> None:
        self.rss.start()
        self.cuda.start()

    def saving(self):
        return self.mem.saving()

    def sample(self, held: Iterable[torch.Tensor] = ()) -> None:
        """A mid-step RSS sample; ``held``: the method's buffers alive now (see ``hold``)."""
        self.rss.sample()
        self.mem.hold(held)

    def measure(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self._parts = self.mem.measure(model, opt)
        self.rss.sample()

    def stop(self, state_bytes: int = 0) -> None:
        self.rss_steps.append(self.rss.stop())
        self.cuda_steps.append(self.cuda.stop())
        parts = self._parts
        parts["extra"] += state_bytes
        parts["total"] += state_bytes
        for key, value in parts.items():
            self.memory[key].append(value)

    def fields(self) -> dict:
        """Record fields: per-step lists, phases and whole-run peaks (RSS, CUDA)."""
        steps = len(self.rss_steps)
        cuda = self.cuda.on
        # resetting VmHWM also resets ru_maxrss: the run's peak is the max of the step peaks
        peak = max([self.pre_peak, rss_bytes(), *self.rss_steps])
        return {
            "rss_peak_bytes": peak,
            "cuda_peak_bytes": max(self.cuda_steps) if cuda and steps else None,
            "phase_bounds": list(self.bounds),
            "phase": [phase_of(s, *self.bounds) for s in range(1, steps + 1)],
            "memory": self.memory,
            "rss_method": self.rss.method,
            "rss_step_peak_bytes": self.rss_steps,
            "cuda_step_peak_bytes": self.cuda_steps if cuda else None,
        }
