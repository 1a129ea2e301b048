"""``AdaRankCallback`` under the real Hugging Face ``Trainer`` (tiny random BERT, CPU).

Every run trains a 2-layer BERT classifier with adapters on query/value/intermediate for 40
optimizer steps, allocating every 4 steps (warm-up 4, final phase from step 32).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from adarank.allocation import BudgetSchedule
from adarank.integrations.transformers import (
    ADAPTER_DIR,
    STATE_NAME,
    AdaRankCallback,
    read_state,
    unwrap_optimizer,
)
from adarank.modules import adapter_layers, add_adapters, load_adapter

TARGETS = ["query", "value", "intermediate.dense"]
BUDGET = 700  # init_rank 2 gives 908 live params; b_0 = 1050, so the first round grows
STEPS = 40


class Classify(torch.utils.data.Dataset):
    """Token sequences labelled by whether their first token is in the upper half."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, 96, (n, 8), generator=g)
        self.y = (self.x[:, 0] > 48).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    """Registered before AdaRankCallback: sees every log and the adapter after each step."""

    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step] = {
            n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n
        }


@pytest.fixture
def make_run(make_tiny_bert, tmp_path):
    """``(out, *, resume=None, prepare=None, budget=BUDGET, **args) -> (trainer, callback, rec)``."""

    def run(
        out,
        *,
        resume=None,
        prepare=None,
        budget=BUDGET,
        train=True,
        extra=None,
        cb=None,
        **overrides,
    ):
        model = make_tiny_bert(0)
        # scaling 1: learning_rate 1e-2 below is tuned for it (add_adapters' default is 16)
        add_adapters(model, TARGETS, init_rank=2, scaling=1.0, modules_to_save="classifier")
        options = dict(
            output_dir=str(out),
            max_steps=STEPS,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            log_level="error",
        )
        options.update(overrides)
        recorder = Recorder()
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**options),
            train_dataset=Classify(),
            callbacks=[recorder],
            **(extra or {}),
        )
        callback = AdaRankCallback(trainer, budget=budget, interval=4, **(cb or {}))
        if prepare is not None:
            callback.prepare_resume(prepare)
        if train:
            trainer.train(resume_from_checkpoint=resume)
        return trainer, callback, recorder

    return run


def _events(callback) -> list[dict]:
    return [{**e.to_dict(), "wall_s": 0.0} for e in callback.history]


def test_ranks_move_under_budget_and_training_continues(make_run, tmp_path):
    # the plain growth rule: this tiny random task has nothing but batch noise to grow into, so
    # the noise floor (the default) grows nothing; here the callback must move ranks both ways
    trainer, cb, rec = make_run(tmp_path / "run", cb={"denoise_growth": False})
    assert cb.controller.denoise_growth is False
    schedule = BudgetSchedule.from_fractions(BUDGET, STEPS, interval=4)
    assert [e.step for e in cb.history] == schedule.allocation_steps()
    assert sum(e.n_pruned for e in cb.history) > 0 and sum(e.n_grown for e in cb.history) > 0
    layers = adapter_layers(trainer.model)
    live = sum(layer.rank * (layer.d_in + layer.d_out + 1) for layer in layers.values())
    assert live == cb.controller.live_params() == cb.history[-1].live_params <= BUDGET
    assert {layer.rank for layer in layers.values()} != {2}
    # the torch optimizer inside accelerate's wrapper holds exactly the live parameters
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    opt = unwrap_optimizer(trainer.optimizer)
    assert cb.controller.optimizer is opt and trainer.lr_scheduler.optimizer.optimizer is opt
    held = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert {id(p) for p in held} == {id(p) for p in trainable} and len(held) == len(trainable)
    for p in held:
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.dim():
                assert value.shape == p.shape
    # after every event that grew a layer, its new triplets train at the next step
    grew = [e for e in cb.history if e.n_grown and e.step + 1 not in {x.step for x in cb.history}]
    assert grew
    for event in grew:
        for name, k in event.grown.items():
            if k:
                key = next(n for n in rec.after_step[event.step] if n.startswith(name + "."))
                key = key.rsplit(".", 1)[0] + ".lora_lambda"
                before, after = rec.after_step[event.step][key], rec.after_step[event.step + 1][key]
                assert torch.all(before[-k:] == 0) and torch.all(after[-k:] != 0)
    losses = [logs["loss"] for _, logs in rec.logs if "loss" in logs]
    assert len(losses) == STEPS // 5 and all(math.isfinite(x) for x in losses)
    lrs = [logs["learning_rate"] for _, logs in rec.logs if "learning_rate" in logs]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # linear decay kept going


def _off_orthonormal(model) -> float:
    worst = 0.0
    for layer in adapter_layers(model).values():
        if layer.rank == 0:
            continue
        P, Q, eye = layer.lora_P.detach(), layer.lora_Q.detach(), torch.eye(layer.rank)
        worst = max(worst, float((P.T @ P - eye).abs().max()), float((Q @ Q.T - eye).abs().max()))
    return worst


def test_retract_keeps_the_factors_orthonormal_under_the_trainer(make_run, tmp_path):
    """retract (the default): orthonormal P, Q after training; off, Adam drifts them."""
    trainer, cb, _ = make_run(tmp_path / "run")
    assert cb.controller.retract is True and cb.history
    assert _off_orthonormal(trainer.model) < 1e-5
    trainer, cb, _ = make_run(tmp_path / "off", cb={"retract": False})
    assert cb.controller.retract is False
    assert _off_orthonormal(trainer.model) > 1e-3


def test_rank_trajectory_reaches_the_trainer_loggers(make_run, tmp_path, capsys):
    trainer, cb, rec = make_run(tmp_path / "run")
    printed = capsys.readouterr().out  # PrinterCallback: the loss logs, not one rank per module
    assert "'loss'" in printed and "rank/" not in printed
    logged = {step: logs for step, logs in rec.logs if "budget/live_params" in logs}
    assert sorted(logged) == [e.step for e in cb.history]
    for event in cb.history:
        logs = logged[event.step]
        assert logs["budget/target_params"] == event.target_params
        assert logs["alloc/pruned"] == event.n_pruned and logs["alloc/grown"] == event.n_grown
        assert {k[5:]: v for k, v in logs.items() if k.startswith("rank/")} == event.ranks
    history = [h for h in trainer.state.log_history if "budget/live_params" in h]
    assert [h["step"] for h in history] == [e.step for e in cb.history]
    # the step's own loss log is kept when an allocation and a logging step coincide
    loss_steps = [step for step, logs in rec.logs if "loss" in logs]
    assert loss_steps == list(range(5, STEPS + 1, 5)) and 20 in {e.step for e in cb.history}


def test_gradient_accumulation_takes_the_same_decisions(make_run, tmp_path):
    _, one, _ = make_run(tmp_path / "a", per_device_train_batch_size=8)
    _, acc, _ = make_run(
        tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    assert [e.step for e in acc.history] == [e.step for e in one.history]
    assert [e.ranks for e in acc.history] == [e.ranks for e in one.history]


@pytest.fixture
def full_run(make_run, tmp_path):
    trainer, cb, _ = make_run(tmp_path / "full", save_strategy="steps", save_steps=12)
    return tmp_path / "full", trainer, cb


def _assert_same_run(a, b) -> None:
    (ta, ca), (tb, cb) = a, b
    assert _events(cb) == _events(ca)
    sa, sb = ta.model.state_dict(), tb.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_checkpoints_hold_adapter_and_state(full_run, make_tiny_bert):
    out, trainer, cb = full_run
    ckpt = out / "checkpoint-24"
    state = read_state(ckpt)
    assert state["global_step"] == 24
    assert state["controller"]["history"] == [e.to_dict() for e in cb.history if e.step <= 24]
    ranks_24 = next(e.ranks for e in reversed(cb.history) if e.step <= 24)
    assert {n: c["rank"] for n, c in state["layers"].items()} == ranks_24
    config = json.loads((ckpt / ADAPTER_DIR / "adapter_config.json").read_text())
    assert {n: c["rank"] for n, c in config["layers"].items()} == ranks_24
    fresh = make_tiny_bert(0)
    load_adapter(fresh, ckpt / ADAPTER_DIR)  # a standalone adapter of that step
    assert {n: la.rank for n, la in adapter_layers(fresh).items()} == ranks_24


def test_resume_from_a_trainer_checkpoint_continues_the_trajectory(full_run, make_run, tmp_path):
    out, trainer, cb = full_run
    # resume_from_checkpoint=True in a directory holding checkpoint-12: nothing else to do
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-12", resumed / "checkpoint-12")
    tr, cr, _ = make_run(resumed, resume=True)
    assert any(e.step > 12 and (e.n_pruned or e.n_grown) for e in cb.history)
    _assert_same_run((trainer, cb), (tr, cr))
    # a checkpoint outside args.output_dir: prepare_resume(dir) first
    tr, cr, _ = make_run(
        tmp_path / "elsewhere", resume=str(out / "checkpoint-24"), prepare=out / "checkpoint-24"
    )
    _assert_same_run((trainer, cb), (tr, cr))


def test_resume_mistakes_are_reported(full_run, make_run, tmp_path):
    out, _, _ = full_run
    ckpt = str(out / "checkpoint-12")
    with pytest.raises(ValueError, match="prepare_resume"):
        make_run(tmp_path / "other", resume=ckpt)
    with pytest.raises(ValueError, match="param_budget=700 but this callback has param_budget"):
        make_run(tmp_path / "other2", prepare=ckpt, budget=800, train=False)
    with pytest.raises(FileNotFoundError, match=STATE_NAME):
        make_run(tmp_path / "other3", prepare=tmp_path, train=False)


def test_load_best_model_at_end_takes_the_best_checkpoints_ranks(make_run, tmp_path):
    from itertools import count

    from safetensors.torch import load_file

    calls = count()
    trainer, cb, _ = make_run(
        tmp_path / "best",
        eval_strategy="steps",
        eval_steps=12,
        save_strategy="steps",
        save_steps=12,
        load_best_model_at_end=True,
        metric_for_best_model="calls",
        greater_is_better=False,  # the first evaluation (step 12) is the best
        extra={
            "eval_dataset": Classify(16, seed=1),
            "compute_metrics": lambda prediction: {"calls": next(calls)},
        },
    )
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-12"
    ranks = {n: c["rank"] for n, c in read_state(best)["layers"].items()}
    assert ranks != cb.history[-1].ranks
    assert {n: la.rank for n, la in adapter_layers(trainer.model).items()} == ranks
    saved = load_file(str(best / "model.safetensors"))
    for key, value in trainer.model.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key


def test_constructor_rejects_bad_setups(make_run, make_tiny_bert, tmp_path):
    trainer, _, _ = make_run(tmp_path / "x", train=False)
    with pytest.raises(ValueError, match="budget"):
        AdaRankCallback(trainer, budget="150%")
    with pytest.raises(ValueError, match="warmup_frac"):
        AdaRankCallback(trainer, budget=BUDGET, warmup_frac=1.5)
    with pytest.raises(ValueError, match="max_rank bounds allow"):
        AdaRankCallback(trainer, budget=10**6)
    with pytest.raises(TypeError, match="Trainer"):
        AdaRankCallback(make_tiny_bert(0), budget=BUDGET)
    plain = Trainer(
        model=make_tiny_bert(0),
        args=TrainingArguments(output_dir=str(tmp_path / "p"), report_to=[], use_cpu=True),
    )
    with pytest.raises(ValueError, match="add_adapters"):
        AdaRankCallback(plain, budget=BUDGET)


def test_integration_does_not_import_lightning():
    code = (
        "import sys\n"
        "import adarank.integrations.transformers\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_sft_trainer_allocates_ranks(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from adarank.models import build_hf_model, build_tokenizer

    model = build_hf_model("tiny-llama", task="causal_lm")
    add_adapters(model, ["q_proj", "v_proj", "up_proj"], init_rank=4)
    rows = [{"text": f"the number {i} is {'odd' if i % 2 else 'even'}."} for i in range(32)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=24,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=4,
        save_steps=12,
        max_length=32,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=build_tokenizer("tiny-llama"),
    )
    cb = AdaRankCallback(trainer, budget=8000, interval=3)
    trainer.train()
    assert cb.history and any(e.n_pruned or e.n_grown for e in cb.history)
    assert cb.controller.live_params() <= 8000
    assert read_state(tmp_path / "sft" / "checkpoint-24")["global_step"] == 24
    # SFTTrainer's own metrics stay in its loss logs, none move into the rank logs
    history = trainer.state.log_history
    assert all("mean_token_accuracy" in h for h in history if "loss" in h)
    assert not any("mean_token_accuracy" in h for h in history if "budget/live_params" in h)
