"""`RankController`: the one object a training loop talks to.

    for batch in loader:
        loss = loss_fn(model(batch)) + controller.regularizer()
        loss.backward()
        controller.observe()            # complete (accumulated, unscaled) gradients
        optimizer.step()
        controller.step(global_step)    # optimizer steps taken so far; may prune and grow
        optimizer.zero_grad()
    controller.close()                  # takes its capture hooks off the layers

What it measures during forward/backward (Σ (Qx)², growth sketches) is recorded by the hooks of
:mod:`adarank.allocation.capture`, which the controller installs on its layers when it is built.
At each allocation step of the :class:`BudgetSchedule` it scores the live triplets, proposes
growth candidates from the gradient of ΔW captured during that step, solves the cost-aware
allocation (:func:`allocate`), resizes the layers and re-indexes the optimizer state. New
triplets are protected from pruning for ``protect_rounds`` allocation rounds. The decisions
depend only on the model, the statistics and the step, so a resumed run (``state_dict``) and
every DDP process (statistics are all-reduced, plans checked) decide the same.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from adarank.allocation.allocator import allocate
from adarank.allocation.budget import BudgetSchedule
from adarank.allocation.capture import install_capture
from adarank.allocation.growth import candidates_from_sketch, sketch_test_matrices
from adarank.allocation.importance import Scorer, make_scorer
from adarank.allocation.optim_sync import replace_parameter
from adarank.allocation.regularizer import orthogonality_penalty
from adarank.allocation.step_stats import gather_step_stats
from adarank.modules.base_layers import is_quantized

__all__ = ["CONTROLLER_DEFAULTS", "RankController", "AllocationEvent"]

#: the one definition of the allocation defaults: :class:`RankController`, ``AdaRankModule``,
#: ``AdaRankCallback`` and the config schema (``adarank.config.structured``) read them from here
CONTROLLER_DEFAULTS = {
    "scorer": "energy",
    "min_rank": 0,
    "max_rank": None,
    "grow": True,
    "orth_reg": 0.0,
    "retract": True,
    "denoise_growth": True,
}

STATE_VERSION = 1


@dataclass
class AllocationEvent:
    """What one allocation decided (plain data; callbacks log it)."""

    step: int
    phase: str
    target_params: int
    live_params: int
    ranks: dict[str, int]
    pruned: dict[str, int]
    grown: dict[str, int]
    score_summary: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def n_pruned(self) -> int:
        return sum(self.pruned.values())

    @property
    def n_grown(self) -> int:
        return sum(self.grown.values())

    def to_dict(self) -> dict:
        return asdict(self)


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return torch.distributed
    return None


class RankController:
    """Allocate adapter ranks under a parameter budget during training.

    Args:
        layers: ``{name: SVDLoRALinear}`` (e.g. ``adarank.adapter_layers(model)``).
        schedule: the :class:`BudgetSchedule`; ``None`` observes only (ranks stay fixed).
        scorer: ``"energy"`` (default), ``"sensitivity"`` (AdaLoRA), ``"magnitude"`` or a
            :class:`~adarank.allocation.importance.Scorer`.
        beta1, beta2: EMA factors of the scorer (AdaLoRA: 0.85, 0.85).
        min_rank, max_rank: per-layer bounds (int or ``{name: int}``); ``max_rank`` may exceed
            the initial rank, capped by each layer's capacity ``min(d_in, d_out)``.
        grow: propose growth candidates (otherwise prune-only).
        candidates_per_layer: growth candidates proposed per layer and allocation.
        protect_rounds: allocation rounds during which a new triplet cannot be pruned.
        orth_reg: γ of the orthogonality regulariser (0 disables, the default). γ = 0.1 keeps
            P, Q close to orthonormal so each triplet's score is its own (no energy split across
            redundant triplets): it is what recovers planted ranks on mixed layer widths. On
            transformers with Adam it slowed or stopped learning in short runs (the penalty's
            gradient dominates the P, Q updates while λ ≈ 0), hence off by default.
        retract: after every optimizer step (in :meth:`step`), make P and Q exactly orthonormal
            again without changing ΔW (:meth:`SVDLoRALinear.retract_`: QR of both factors, SVD
            of the r × r core), so λ are ΔW's singular values and the scores compare triplets
            on one scale. Exact where the penalty is approximate, and free of its gradient.
            On by default: on MiniLM it removed a collapse of one seed in three at r = 8 and
            tied elsewhere (docs/bench_quality.md); ``False`` restores plain Adam factors.
        denoise_growth: score growth candidates by what of their gradient stands above the
            minibatch noise: ``σ² − ν²`` instead of ``σ²`` (ν: the top singular value of the
            sign-flipped gradient of the same batch, :mod:`adarank.allocation.growth`), and
            propose none that does not stand above it. Without it a noise direction is scored
            as if it were signal and displaces live triplets (docs/theory.md, "The noise floor
            of candidates"). On by default; ``False`` restores the plain rule.
        max_delta_ratio: bound every layer's ‖ΔW‖₂ by this multiple of its base weight's
            ‖W0‖₂ (:meth:`SVDLoRALinear.cap_delta_` after each step, after the retraction;
            exact with ``retract=True``, per triplet without). ``None`` (the default) leaves ΔW
            free. A trust region against the runaway ΔW of too high a learning rate.
        optimizer: optimizer to keep consistent (also :meth:`attach_optimizer`).
        seed: seed of the randomized SVD used for growth.
    """

    def __init__(
        self,
        layers: Mapping,
        schedule: BudgetSchedule | None,
        *,
        scorer: str | Scorer = CONTROLLER_DEFAULTS["scorer"],
        beta1: float = 0.85,
        beta2: float = 0.85,
        min_rank: int | Mapping[str, int] = CONTROLLER_DEFAULTS["min_rank"],
        max_rank: int | Mapping[str, int] | None = CONTROLLER_DEFAULTS["max_rank"],
        grow: bool = CONTROLLER_DEFAULTS["grow"],
        candidates_per_layer: int = 4,
        protect_rounds: int = 1,
        orth_reg: float = CONTROLLER_DEFAULTS["orth_reg"],
        retract: bool = CONTROLLER_DEFAULTS["retract"],
        denoise_growth: bool = CONTROLLER_DEFAULTS["denoise_growth"],
        max_delta_ratio: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
    ) -> None:
        if not layers:
            raise ValueError("RankController needs at least one adapter layer")
        if candidates_per_layer < 0 or protect_rounds < 0:
            raise ValueError(
                f"candidates_per_layer={candidates_per_layer} and protect_rounds={protect_rounds} "
                "must be ≥ 0"
            )
        if orth_reg < 0:
            raise ValueError(f"orth_reg={orth_reg} must be ≥ 0")
        self.layers = dict(layers)
        self.schedule = schedule
        self.scorer = make_scorer(scorer, beta1, beta2)
        self.grow = bool(grow)
        self.candidates_per_layer = int(candidates_per_layer)
        self.protect_rounds = int(protect_rounds)
        self.orth_reg = float(orth_reg)
        if not isinstance(retract, bool):
            raise TypeError(f"retract={retract!r}: expected True or False")
        self.retract = retract
        if not isinstance(denoise_growth, bool):
            raise TypeError(f"denoise_growth={denoise_growth!r}: expected True or False")
        self.denoise_growth = denoise_growth
        if max_delta_ratio is not None and (
            isinstance(max_delta_ratio, bool) or not float(max_delta_ratio) > 0
        ):
            raise ValueError(f"max_delta_ratio={max_delta_ratio!r}: expected a number > 0 or None")
        self.max_delta_ratio = None if max_delta_ratio is None else float(max_delta_ratio)
        quantized = [n for n, la in layers.items() if is_quantized(la.base_layer)]
        if self.max_delta_ratio is not None and quantized:
            raise TypeError(
                f"max_delta_ratio={max_delta_ratio} needs dense base weights to measure ‖W0‖₂; "
                f"{quantized[0]!r} (and {len(quantized) - 1} more) are quantized"
            )
        self._base_norm: dict[str, float] = {}  # ‖W0‖₂ per layer, measured at the first cap
        self.optimizer = optimizer
        self.seed = int(seed)
        self.min_rank = {n: self._bound(min_rank, n, 0) for n in self.layers}
        self.max_rank = {}
        for n, layer in self.layers.items():
            cap = min(layer.d_in, layer.d_out)
            hi = min(self._bound(max_rank, n, cap), cap)
            if not 0 <= self.min_rank[n] <= hi:
                raise ValueError(
                    f"layer {n!r}: min_rank={self.min_rank[n]} must be in [0, max_rank={hi}]"
                )
            layer.max_rank = max(hi, layer.rank)
            self.max_rank[n] = hi
        if schedule is not None:
            schedule.check_bounds(self.min_params(), self.max_params())
        self.history: list[AllocationEvent] = []
        self.global_step = 0
        self._birth = {
            n: torch.full((layer.rank,), -1, dtype=torch.long) for n, layer in self.layers.items()
        }
        self._captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._observed_since_step = False
        self._warned: set[str] = set()
        self.alloc_time_s = 0.0
        # the hooks that record Σ (Qx)² and the growth sketches (removed by close())
        self.capture = install_capture(self.layers)
        self._closed = False
        self._set_capture(1)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _bound(value, name: str, default: int) -> int:
        if value is None:
            return default
        v = value.get(name, default) if isinstance(value, Mapping) else value
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"rank bound for {name!r} must be an int, got {v!r}")
        return v

    def min_params(self) -> int:
        return sum(self.min_rank[n] * layer.triplet_cost for n, layer in self.layers.items())

    def max_params(self) -> int:
        return sum(self.max_rank[n] * layer.triplet_cost for n, layer in self.layers.items())

    def ranks(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in self.layers.items()}

    def live_params(self) -> int:
        return sum(layer.live_params for layer in self.layers.values())

    @property
    def last_event(self) -> AllocationEvent | None:
        return self.history[-1] if self.history else None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep ``optimizer`` consistent with the live triplets from now on."""
        self.optimizer = optimizer

    def regularizer(self) -> torch.Tensor:
        """γ-weighted orthogonality penalty to add to the training loss."""
        return orthogonality_penalty(self.layers.values(), self.orth_reg)

    def retract_factors(self) -> None:
        """Re-orthonormalise every layer's P and Q keeping ΔW (what ``retract=True`` does in
        :meth:`step`); slots, signs and Parameter objects are kept, so the optimizer state stays
        attached to the same triplets."""
        for layer in self.layers.values():
            layer.retract_()

    def cap_deltas(self) -> None:
        """Bound every layer's ΔW by ``max_delta_ratio`` · ‖W0‖₂ (what :meth:`step` does when
        ``max_delta_ratio`` is set; ‖W0‖₂ is measured once, at the first call)."""
        for name, layer in self.layers.items():
            if name not in self._base_norm:
                w = layer.base_weight.detach().float()
                self._base_norm[name] = float(torch.linalg.matrix_norm(w, ord=2))
            layer.cap_delta_(self.max_delta_ratio * self._base_norm[name])

    def state_memory_bytes(self) -> int:
        """Bytes of allocation state kept between steps (scorer + birth steps)."""
        births = sum(t.numel() * t.element_size() for t in self._birth.values())
        return self.scorer.memory_bytes() + births

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Remove the capture hooks from the layers (idempotent).

        The layers, history and ``state_dict()`` stay usable; ``observe()`` and ``step()`` no
        longer are.
        """
        self.capture.remove()
        self._closed = True

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"RankController.{what}() after close(): its capture hooks were removed; "
                "build a new RankController to allocate again"
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _sketch_seed(self, step: int, index: int) -> int:
        return self.seed * 1_000_003 + step * 1009 + index

    def _set_capture(self, next_step: int) -> None:
        """Arm the gradient sketches for ``next_step`` if it is a growth allocation step."""
        s = self.schedule
        want = (
            s is not None
            and self.grow
            and self.candidates_per_layer > 0
            and s.is_allocation_step(next_step)
            and s.allows_growth(next_step)
        )
        for i, (name, layer) in enumerate(self.layers.items()):
            room = self.max_rank[name] - layer.rank
            if not want or room <= 0:
                self.capture[name].capture_gradient(False)
                continue
            k = min(self.candidates_per_layer, room)
            sketch = sketch_test_matrices(
                layer.lora_P, layer.lora_Q, k, seed=self._sketch_seed(next_step, i)
            )
            self.capture[name].capture_gradient(True, sketch=sketch, noise=self.denoise_growth)

    # ------------------------------------------------------------------ observe
    def observe(self) -> None:
        """Consume the statistics of one optimizer step (call after backward/accumulation).

        The per-slot vectors of every layer are packed into one buffer
        (:func:`~adarank.allocation.step_stats.gather_step_stats`: one all-reduce under DDP, one
        device→host copy) and the scorer updates every slot in a few vectorised operations.
        """
        self._check_open("observe")
        self._observed_since_step = True
        dist = _dist()
        st = gather_step_stats(self.layers, self.capture, self.scorer, dist, self._warn_once)
        self.scorer.update_batch(st.layers, st.z_sum, st.counts, st.stats, st.valid)
        for (name, _), ok in zip(st.layers, st.valid):
            if ok:
                self._consume_sketch(name, self.capture[name], dist)

    def _consume_sketch(self, name, cap, dist) -> None:
        if cap.captured_sketch is not None and cap.captured_tokens:
            parts = [*cap.captured_sketch, *(cap.captured_noise_sketch or ())]
            if dist is not None:
                flat = torch.cat([t.flatten() for t in parts])
                dist.all_reduce(flat)
                flat /= dist.get_world_size()  # DDP averages gradients across processes
                parts = [
                    c.view_as(t) for c, t in zip(flat.split([t.numel() for t in parts]), parts)
                ]
            y, w, *noise = (t.detach().cpu() for t in parts)
            psi = cap.sketch[1]
            samples = cap.captured_inputs().detach().cpu()
            self._captured[name] = (y, w, psi.cpu(), samples, tuple(noise) or None)
        cap.capture_gradient(False)

    # ------------------------------------------------------------------ step
    def step(self, global_step: int, updated: bool = True) -> AllocationEvent | None:
        """Call after ``optimizer.step()``; ``global_step`` = optimizer steps taken so far.

        ``updated=False`` says the optimizer left the adapters alone at this step (a skipped
        non-finite step): the retraction then has nothing to restore and does not run, so the
        step changes nothing (the allocation schedule still counts it).

        Returns:
            the :class:`AllocationEvent` if this step re-allocated, else ``None``.
        """
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step={global_step!r}: expected a non-negative int")
        self._check_open("step")
        if not isinstance(updated, bool):
            raise TypeError(f"updated={updated!r}: expected True or False")
        self.global_step = global_step
        if self.retract and updated:
            self.retract_factors()
        if self.max_delta_ratio is not None and updated:
            self.cap_deltas()
        event = None
        if self.schedule is not None and self.schedule.is_allocation_step(global_step):
            if not self._observed_since_step:
                self._warn_once(
                    "noobserve",
                    "RankController.step() at an allocation step without observe() since the "
                    "last step: call observe() after backward and before optimizer.step()",
                )
            event = self._allocate(global_step)
        self._captured = {}
        self._observed_since_step = False
        self._set_capture(global_step + 1)
        return event

    def _allocate(self, step: int) -> AllocationEvent:
        t0 = time.perf_counter()
        sched = self.schedule
        budget = sched.budget(step)
        final = step == sched.final_start
        protect_window = self.protect_rounds * sched.interval
        scores, forced, costs, cands, n_live = {}, {}, {}, {}, {}
        for name, layer in self.layers.items():
            live = self.scorer.scores(name, layer).double().cpu()
            n_live[name] = layer.rank
            costs[name] = layer.triplet_cost
            birth = self._birth[name]
            protected = (birth >= 0) & (step - birth <= protect_window) & (not final)
            cand = None
            room = self.max_rank[name] - layer.rank
            if name in self._captured and room > 0 and sched.allows_growth(step):
                y, w, psi, samples, noise = self._captured[name]
                k = min(self.candidates_per_layer, room)
                cand = candidates_from_sketch(y, w, psi, layer.lora_P, layer.lora_Q, k, noise)
                if noise is not None:  # denoise_growth: none at or under the noise floor
                    cand = cand.keep(cand.signal > 0)
                cand.energy_in = self._mean_input_energy(samples, cand.q_rows)
                cands[name] = cand
                cs = self.scorer.candidate_scores(cand.signal, cand.energy_in).cpu()
                live = torch.cat([live, cs])
                protected = torch.cat([protected, torch.zeros(cand.k, dtype=torch.bool)])
            scores[name] = live
            forced[name] = protected
        plan = allocate(scores, costs, budget, self.min_rank, self.max_rank, forced)
        self._check_consistent(plan, step)
        pruned, grown = {}, {}
        for name, layer in self.layers.items():
            sel = plan.selected[name]
            r = n_live[name]
            keep = sel[sel < r]
            new_idx = sel[sel >= r] - r
            pruned[name] = r - keep.numel()
            grown[name] = int(new_idx.numel())
            if pruned[name] == 0 and grown[name] == 0:
                continue
            self._resize(name, layer, keep, cands.get(name), new_idx, step)
        live_scores = torch.cat(
            [self.scorer.scores(n, la).double().cpu() for n, la in self.layers.items()]
        )
        summary = {"candidates": float(sum(c.k for c in cands.values()))}
        if live_scores.numel():
            summary.update(
                min=float(live_scores.min()),
                median=float(live_scores.median()),
                max=float(live_scores.max()),
            )
        self.alloc_time_s += time.perf_counter() - t0
        event = AllocationEvent(
            step=step,
            phase=sched.phase(step),
            target_params=budget,
            live_params=self.live_params(),
            ranks=self.ranks(),
            pruned=pruned,
            grown=grown,
            score_summary=summary,
            wall_s=time.perf_counter() - t0,
        )
        self.history.append(event)
        return event

    @staticmethod
    def _mean_input_energy(samples: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
        """E[(vᵀx)²] per candidate from the sampled inputs of every process."""
        # float32 product (the samples are float32 already), float64 sums
        sq = (
            (samples.float() @ q_rows.float().T).double().pow(2).sum(0)
            if samples.shape[0]
            else None
        )
        count = float(samples.shape[0])
        dist = _dist()
        if dist is not None:
            buf = torch.zeros(q_rows.shape[0] + 1, dtype=torch.float64)
            if sq is not None:
                buf[:-1] = sq
            buf[-1] = count
            if dist.get_backend() == "nccl":
                buf = buf.cuda()
            dist.all_reduce(buf)
            sq, count = buf[:-1].cpu(), float(buf[-1].item())
        if sq is None or count == 0:
            return torch.ones(q_rows.shape[0], dtype=torch.float64)
        return sq / count

    def _resize(self, name, layer, keep, cand, new_idx, step) -> None:
        old = (layer.lora_P, layer.lora_lambda, layer.lora_Q)
        drop = sorted(set(range(layer.rank)) - set(keep.tolist()))
        if drop:
            layer.prune(drop)
        n_new = int(new_idx.numel())
        new_state = {}
        if n_new:
            layer.grow(cand.p_cols[:, new_idx].float(), cand.q_rows[new_idx].float())
            new_state = self.scorer.new_slot_state(
                cand.signal[new_idx].cpu(), cand.energy_in[new_idx].cpu(), layer.scaling
            )
        self.capture[name].remap(keep, n_new)
        if self.optimizer is not None:
            new = (layer.lora_P, layer.lora_lambda, layer.lora_Q)
            for o, nw, dim in zip(old, new, (1, 0, 0)):
                if not replace_parameter(self.optimizer, o, nw, keep, n_new, dim):
                    self._warn_once(
                        f"noopt:{name}",
                        f"adapter parameter of {name!r} not found in the attached optimizer",
                    )
        self.scorer.remap(name, keep, n_new, new_state)
        self._birth[name] = torch.cat(
            [self._birth[name][keep], torch.full((n_new,), step, dtype=torch.long)]
        )

    def _check_consistent(self, plan, step: int) -> None:
        dist = _dist()
        if dist is None:
            return
        text = ";".join(f"{n}:{plan.selected[n].tolist()}" for n in sorted(plan.selected))
        digest = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
        mine = torch.tensor([digest], dtype=torch.long)
        if dist.get_backend() == "nccl":
            mine = mine.cuda()
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        if len({int(g.item()) for g in gathered}) != 1:
            raise RuntimeError(
                f"allocation at step {step} differs across processes; statistics must be "
                "all-reduced before allocation (is every process running the same model?)"
            )

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict:
        return {
            "layers": {n: [la.d_out, la.d_in] for n, la in self.layers.items()},
            "final_budget": None if self.schedule is None else self.schedule.final_budget,
            "total_steps": None if self.schedule is None else self.schedule.total_steps,
            "scorer": self.scorer.name,
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "global_step": self.global_step,
            "fingerprint": self._fingerprint(),
            "ranks": self.ranks(),
            "scorer": self.scorer.state_dict(),
            "birth": {n: t.clone() for n, t in self._birth.items()},
            "history": [e.to_dict() for e in self.history],
            "alloc_time_s": self.alloc_time_s,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore; the layers must already have the saved ranks (see ``adarank.resize_to``)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown RankController state version {state.get('version')!r}")
        mine, theirs = self._fingerprint(), state["fingerprint"]
        if mine["layers"] != theirs["layers"]:
            only_here = sorted(set(mine["layers"]) - set(theirs["layers"]))[:5]
            only_there = sorted(set(theirs["layers"]) - set(mine["layers"]))[:5]
            diff = [
                n
                for n in mine["layers"]
                if n in theirs["layers"] and mine["layers"][n] != list(theirs["layers"][n])
            ]
            raise ValueError(
                "controller state is from a different model: layers only in this model "
                f"{only_here}, only in the checkpoint {only_there}, shape differences {diff[:5]}"
            )
        for key in ("final_budget", "total_steps", "scorer"):
            if mine[key] != theirs[key]:
                raise ValueError(
                    f"controller state was saved with {key}={theirs[key]!r} but this run has "
                    f"{key}={mine[key]!r}; resume with the same budget and schedule"
                )
        if state["ranks"] != self.ranks():
            raise ValueError(
                "layer ranks differ from the saved controller state; resize the layers first "
                "(adarank.modules.resize_to(model, ranks))"
            )
        self.global_step = int(state["global_step"])
        self.scorer.load_state_dict(state["scorer"])
        self._birth = {n: t.clone().long() for n, t in state["birth"].items()}
        self.history = [AllocationEvent(**e) for e in state["history"]]
        self.alloc_time_s = float(state.get("alloc_time_s", 0.0))
        self._captured = {}
        if not self._closed:
            self._set_capture(self.global_step + 1)
