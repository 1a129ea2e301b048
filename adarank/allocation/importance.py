r"""Per-triplet importance scores, fed once per optimizer step.

Three pluggable scorers share one interface (:class:`Scorer`): ``slot_stats(layer)`` returns the
few per-slot vectors one optimizer step contributes (computed where the layer lives, from its
complete gradients), the controller copies the vectors of *all* layers to the host in one
transfer, and ``update_batch`` / ``update`` fold them into the EMAs; ``scores(layer)`` for the live
triplets, ``candidate_scores(sigma, energy_in)`` for growth candidates on the same scale, and
``remap(keep, n_new, new_state)`` when the layer is resized. State is **per triplet** (a few
floats each), not per element: it is ≪ the adapter itself.

``energy`` (default) — the energy a triplet carries in the layer output at its one-step
Gauss–Newton optimum of λ::

    E_i(λ) = E_x ‖ΔW_i x‖² = s² λ² ‖p_i‖² m_i,        m_i = E[(q_iᵀ x)²]   (EMA, β1)
    λ̂_i = λ_i − g_i / h_i,   g_i = ∂L/∂λ_i,   h_i = s² ‖p_i‖² m_i          (EMA of λ̂‖p_i‖, β1)
    S_i = E_i(λ̂_i)

    h_i is the curvature of L in λ_i for a squared loss ½‖y − y*‖² on the layer's output (unit
    output curvature). For a converged triplet g ≈ 0 and S_i is its current output energy — twice
    the loss increase from deleting it (docs/theory.md §Importance). For a young
    triplet still moving, S_i is the energy the gradient predicts it will carry, so it is not
    pruned merely for being young. A growth candidate is the case λ = 0: with unit directions
    (u, v), σ = uᵀ G v (G = ∂L/∂W) and input energy c = vᵀ C v, ``S = σ² / c`` — one score, one
    scale, for live triplets and candidates alike.

``sensitivity`` — AdaLoRA (Zhang et al. 2023, §3.2, Eq. 8–11): sensitivity ``I = |w ∂L/∂w|``
    averaged over the triplet's λ, P column and Q row; EMA Ī (β1) and uncertainty
    Ū = EMA|I − Ī| (β2); score Σ_groups Ī·Ū. Candidates get the first-order sensitivity of λ at its
    predicted value, ``σ²/c``.

``magnitude`` — plain ``s |λ_i| ‖p_i‖ ‖q_i‖`` (the singular value the triplet carries);
    candidates ``|σ| / c``.
"""

from __future__ import annotations

import torch

__all__ = [
    "Scorer",
    "EnergyScorer",
    "SensitivityScorer",
    "MagnitudeScorer",
    "make_scorer",
    "SCORERS",
]


class Scorer:
    """Base class: per-layer state dict of 1-D tensors indexed by live slot."""

    name = "base"
    state_keys: tuple[str, ...] = ()

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        for key, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{key}={b}: expected a value in [0, 1)")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    # -- state --------------------------------------------------------------------------
    def _layer_state(self, name: str, rank: int) -> dict[str, torch.Tensor]:
        st = self.state.get(name)
        if st is None or next(iter(st.values())).numel() != rank:
            st = {k: torch.zeros(rank, dtype=torch.float64) for k in self.state_keys}
            st["seen"] = torch.zeros(rank, dtype=torch.float64)
            self.state[name] = st
        return st

    def _ema(self, st: dict, key: str, value: torch.Tensor, beta: float) -> None:
        fresh = st["seen"] == 0
        st[key] = torch.where(fresh, value, beta * st[key] + (1 - beta) * value)

    def remap(
        self,
        name: str,
        keep: torch.Tensor,
        n_new: int,
        new_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Re-index after prune (``keep``) then grow (``n_new`` appended slots).

        ``new_state`` may give initial values for the new slots (e.g. ``m`` and ``lam_hat``
        known from the growth candidate); slots with given state count as already seen.
        """
        st = self.state.get(name)
        if st is None:
            return
        given = {k: v for k, v in (new_state or {}).items() if k in st}
        for k, v in st.items():
            new = v.new_zeros(n_new)
            if n_new and k in given:
                new = given[k].double().reshape(n_new)
            elif n_new and k == "seen" and given:
                new = v.new_ones(n_new)
            st[k] = torch.cat([v[keep], new])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values())

    def state_dict(self) -> dict:
        return {n: {k: v.clone() for k, v in st.items()} for n, st in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        self.state = {n: {k: v.clone().double() for k, v in st.items()} for n, st in state.items()}

    # -- interface --------------------------------------------------------------------------
    #: keys of :meth:`slot_stats`
    stat_keys: tuple[str, ...] = ()

    def slot_stats(self, layer) -> dict[str, torch.Tensor] | None:
        """Per-slot 1-D tensors (length ``layer.rank``, on the layer's device) for :meth:`update`.

        Returns exactly :attr:`stat_keys`, or ``None`` when the step carries nothing for this
        layer (e.g. a gradient is missing). The controller packs the vectors of all layers into
        one buffer and moves it to the host at once.
        """
        return {}

    def update_batch(
        self,
        layers: list[tuple[str, object]],
        z_sum: torch.Tensor,
        counts: list[float],
        stats: dict[str, torch.Tensor],
        valid: list[bool],
    ) -> None:
        """Fold one step of every layer into the state.

        Args:
            layers: ``(name, layer)`` in the packing order.
            z_sum: ``Σ (Qx)²`` of all slots, concatenated in that order (host, float64).
            counts: tokens behind ``z_sum`` per layer.
            stats: ``{key: all slots}`` of :meth:`slot_stats` (host, float64).
            valid: per layer, False to leave its state untouched this step.

        The default calls :meth:`update` per layer; scorers override it to update every slot of
        every layer in a few vectorised operations.
        """
        off = 0
        for (name, layer), count, ok in zip(layers, counts, valid):
            sl = slice(off, off + layer.rank)
            off += layer.rank
            if ok:
                z_mean = z_sum[sl] / count if count else None
                self.update(name, layer, z_mean, {k: v[sl] for k, v in stats.items()})

    def update(
        self, name: str, layer, z_sq_mean: torch.Tensor | None, stats: dict[str, torch.Tensor]
    ) -> bool:
        """Fold one step into the state; ``stats`` = :meth:`slot_stats` on the host (float64)."""
        raise NotImplementedError

    def scores(self, name: str, layer) -> torch.Tensor:
        raise NotImplementedError

    def candidate_scores(self, sigma: torch.Tensor, energy_in: torch.Tensor) -> torch.Tensor:
        return sigma.double() ** 2 / energy_in.double().clamp_min(1e-12)

    def new_slot_state(self, sigma: torch.Tensor, energy_in: torch.Tensor, scaling: float) -> dict:
        """Initial per-slot state of grown triplets (default: none, they start unseen)."""
        return {}


def _col_norms(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lam = layer.lora_lambda.detach().double().cpu()
    p = layer.lora_P.detach().double().cpu().norm(dim=0)
    q = layer.lora_Q.detach().double().cpu().norm(dim=1)
    return lam, p, q


class EnergyScorer(Scorer):
    """Output energy at the one-step Gauss–Newton optimum — see module docstring.

    Computed on the coefficient ``a_i = λ_i ‖p_i‖`` along the unit direction ``p_i/‖p_i‖`` so that
    it stays well defined while ``p_i`` is still small (e.g. LoRA-style ``P = 0`` init).
    """

    name = "energy"
    state_keys = ("m", "a_hat")
    stat_keys = ("g", "lam", "p")

    def slot_stats(self, layer):
        lam = layer.lora_lambda
        return {
            "g": lam.grad.detach() if lam.grad is not None else torch.zeros_like(lam.detach()),
            "lam": lam.detach(),
            "p": layer.lora_P.detach().float().norm(dim=0),
        }

    @staticmethod
    def _a_hat(lam, p, g, s2, m_now):
        """Gauss–Newton optimum of ``a = λ‖p‖``: ``a − (∂L/∂a) / (s² m)`` (g = 0: a itself)."""
        g_a = g / p.clamp_min(1e-12)  # ∂L/∂a = (∂L/∂λ) / ‖p‖
        h_a = (s2 * m_now).clamp_min(1e-12)  # ∂²L/∂a², unit output curvature
        return lam * p - g_a / h_a

    def update(self, name, layer, z_sq_mean, stats):
        st = self._layer_state(name, layer.rank)
        if z_sq_mean is None or layer.rank == 0:
            return False
        m_now = z_sq_mean.double().cpu()
        a_hat = self._a_hat(stats["lam"], stats["p"], stats["g"], layer.scaling**2, m_now)
        self._ema(st, "m", m_now, self.beta1)
        self._ema(st, "a_hat", a_hat, self.beta1)
        st["seen"] = st["seen"] + 1
        return True

    def update_batch(self, layers, z_sum, counts, stats, valid):
        ranks = [layer.rank for _, layer in layers]
        states = [self._layer_state(name, r) for (name, _), r in zip(layers, ranks)]
        use = [bool(ok and c > 0) for ok, c in zip(valid, counts)]
        if not any(use) or not sum(ranks):
            return
        per_slot = torch.tensor(ranks)

        def spread(values, dtype=torch.float64):
            return torch.repeat_interleave(torch.tensor(values, dtype=dtype), per_slot)

        mask = spread(use, torch.bool)
        m_now = z_sum / spread([max(c, 1.0) for c in counts])
        s2 = spread([layer.scaling**2 for _, layer in layers])
        a_now = self._a_hat(stats["lam"], stats["p"], stats["g"], s2, m_now)
        cat = {k: torch.cat([st[k] for st in states]) for k in ("m", "a_hat", "seen")}
        fresh = cat["seen"] == 0
        b = self.beta1
        new = {
            "m": torch.where(fresh, m_now, b * cat["m"] + (1 - b) * m_now),
            "a_hat": torch.where(fresh, a_now, b * cat["a_hat"] + (1 - b) * a_now),
        }
        new = {k: torch.where(mask, v, cat[k]) for k, v in new.items()}
        new["seen"] = cat["seen"] + mask.double()
        for k, v in new.items():
            for st, part in zip(states, v.split(ranks)):
                st[k] = part

    def scores(self, name, layer):
        st = self._layer_state(name, layer.rank)
        lam, p, _ = _col_norms(layer)
        a_hat = torch.where(st["seen"] > 0, st["a_hat"], lam * p)
        return layer.scaling**2 * a_hat**2 * st["m"]

    def new_slot_state(self, sigma: torch.Tensor, energy_in: torch.Tensor, scaling: float) -> dict:
        """State of grown triplets (unit p): â = −σ / (s c), the Gauss–Newton step from λ = 0."""
        c = energy_in.double().clamp_min(1e-12)
        return {"m": c, "a_hat": -sigma.double() / (scaling * c)}


class SensitivityScorer(Scorer):
    """AdaLoRA's Ī·Ū, reduced per triplet (λ, P column, Q row groups)."""

    name = "sensitivity"
    state_keys = ("i_lam", "u_lam", "i_p", "u_p", "i_q", "u_q")
    stat_keys = ("lam", "p", "q")

    def slot_stats(self, layer):
        grads = (layer.lora_lambda.grad, layer.lora_P.grad, layer.lora_Q.grad)
        if any(g is None for g in grads):
            return None
        with torch.no_grad():
            return {
                "lam": (layer.lora_lambda * grads[0]).abs(),
                "p": (layer.lora_P * grads[1]).abs().mean(0),
                "q": (layer.lora_Q * grads[2]).abs().mean(1),
            }

    def update(self, name, layer, z_sq_mean, stats):
        st = self._layer_state(name, layer.rank)
        if layer.rank == 0 or not stats:
            return False
        for group in ("lam", "p", "q"):
            sens = stats[group]
            i_old = st[f"i_{group}"]
            self._ema(st, f"i_{group}", sens, self.beta1)
            unc = (sens - torch.where(st["seen"] == 0, sens, i_old)).abs()
            self._ema(st, f"u_{group}", unc, self.beta2)
        st["seen"] = st["seen"] + 1
        return True

    def scores(self, name, layer):
        st = self._layer_state(name, layer.rank)
        return sum(st[f"i_{g}"] * st[f"u_{g}"] for g in ("lam", "p", "q"))


class MagnitudeScorer(Scorer):
    """``s |λ_i| ‖p_i‖ ‖q_i‖`` (stateless)."""

    name = "magnitude"
    state_keys = ("unused",)

    def update(self, name, layer, z_sq_mean, stats):
        self._layer_state(name, layer.rank)
        return True

    def scores(self, name, layer):
        lam, p, q = _col_norms(layer)
        return layer.scaling * lam.abs() * p * q

    def candidate_scores(self, sigma, energy_in):
        return sigma.double().abs() / energy_in.double().clamp_min(1e-12)


SCORERS = {cls.name: cls for cls in (EnergyScorer, SensitivityScorer, MagnitudeScorer)}


def make_scorer(scorer: str | Scorer, beta1: float = 0.85, beta2: float = 0.85) -> Scorer:
    """Build a scorer by name (``energy``, ``sensitivity``, ``magnitude``) or pass one through."""
    if isinstance(scorer, Scorer):
        return scorer
    if scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r}: expected one of {sorted(SCORERS)} or a Scorer")
    return SCORERS[scorer](beta1=beta1, beta2=beta2)
