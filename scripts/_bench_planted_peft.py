"""Planted-rank task: adarank (adaptive) vs PEFT AdaLoRA on the same ``ParallelLinear`` base.

PEFT AdaLoRA's budget counts ranks, so ``target_r`` = planted total rank / modules (the same
total rank as the planted teacher); its rank-recovery error is read from its final rank pattern.
Two starts: ``init_r = ⌈1.5·target_r⌉`` (AdaLoRA's usual b_0 ≈ 1.5 b_T) and ``init_r`` = the
largest planted rank (so prune-only can in principle reach every planted rank). The orthogonality
regulariser (γ = 0.1) is added by hand because PEFT adds it only to a ``.loss`` of HF outputs.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from _bench_common import adalora_ranks, adalora_state_bytes

from adarank.models.planted import PlantedTask, build_planted_task
from adarank.models.planted_fit import fit_planted

PLANTED_RANKS = "16,8,8,4,4,2,2,1,1,1,1,0"
ADALORA_LRS = (5e-3, 2e-2)
ADALORA_ORTH = 0.1


def _orth_penalty(model: torch.nn.Module) -> torch.Tensor:
    """PEFT AdaLoRA's regulariser: mean over A and B of ‖AAᵀ − I‖_F (‖BᵀB − I‖_F)."""
    terms = []
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0])))
    return torch.stack(terms).mean()


def fit_adalora(
    task: PlantedTask, init_r: int, target_r: int, *, steps: int, lr: float, seed: int
) -> dict:
    """Train PEFT AdaLoRA on the planted task with the loop of ``fit_planted``."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = AdaLoraConfig(
        init_r=init_r,
        target_r=target_r,
        lora_alpha=init_r,  # scaling lora_alpha / init_r = 1, like adarank
        tinit=int(0.1 * steps),
        tfinal=int(0.25 * steps),
        deltaT=25,
        total_step=steps,
        target_modules=r"blocks\.\d+",
    )
    model = get_peft_model(copy.deepcopy(task.model), cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    state_peak = 0  # PEFT frees its buffers at the final phase: report the peak
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 - (step - 1) / steps)
        idx = torch.randint(0, len(task.x_train), (256,), generator=gen)
        loss = task.loss(model(task.x_train[idx]), task.y_train[idx])
        (loss + ADALORA_ORTH * _orth_penalty(model)).backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == 2:
            state_peak = max(state_peak, adalora_state_bytes(model))
    ranks = adalora_ranks(model)
    ranks = {n: ranks[n] for n in task.module_names}
    return {
        "method": f"peft-adalora {init_r}→{target_r}",
        "seed": seed,
        "lr": lr,
        "heldout_mse": task.heldout_mse(model),
        "ranks": ranks,
        "rank_recovery_error": task.rank_recovery_error(ranks),
        "live_params": sum(r * (2 * d + 1) for r, d in zip(ranks.values(), task.dims)),
        "param_budget": task.planted_params,
        "wall_s": time.perf_counter() - t0,
        "allocator_state_bytes": state_peak,
    }


def run_planted(args) -> list[dict]:
    """adarank (fit_planted defaults) vs PEFT AdaLoRA at two starts and two learning rates."""
    ranks = [4, 2, 1, 0] if args.smoke else PLANTED_RANKS
    dims = "16" if args.smoke else "64"
    out = []
    for seed in range(args.planted_seeds):
        task = build_planted_task(ranks, dims, seed=seed)
        target_r = max(1, round(sum(task.ranks) / len(task.ranks)))
        res = fit_planted(task, "adaptive", steps=args.planted_steps, seed=seed)
        rec = {k: v for k, v in res.items() if k not in ("model", "controller")}
        rec.update(method="adarank", lr=5e-3)
        out.append(rec)
        print(f"planted seed={seed} adarank err={rec['rank_recovery_error']:.3f}", flush=True)
        for init_r in sorted({math.ceil(1.5 * target_r), max(task.ranks)}):
            for lr in ADALORA_LRS[:1] if args.smoke else ADALORA_LRS:
                rec = fit_adalora(
                    task, init_r, target_r, steps=args.planted_steps, lr=lr, seed=seed
                )
                out.append(rec)
                print(
                    f"planted seed={seed} {rec['method']} lr={lr:g} "
                    f"err={rec['rank_recovery_error']:.3f}",
                    flush=True,
                )
    return out
