"""Set-ups for the Hugging Face ``Trainer`` / TRL examples of the docs, offline.

The examples load a Hub model, tokenizer and dataset. Here ``from_pretrained`` and
``datasets.load_dataset`` are replaced (for the block only) by stand-ins that accept exactly the
ids the docs name and return tiny random-init models (adarank's byte-level tokenizer, a 2-layer
BERT or Llama) and a few dozen rows, so the rest of each example — ``TrainingArguments``, the
trainer, ``AdaRankCallback``, saving and export — runs for real.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

__all__ = ["HF_FIXTURES"]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROTTEN_TOMATOES = "cornell-movie-review-data/rotten_tomatoes"
CAPYBARA = "trl-lib/Capybara"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = "good bad film plot actor dull great boring fun slow smart".split()


def _only(expected: str, what: str) -> Callable[[str], None]:
    def check(name: str) -> None:
        assert name == expected, (
            f"the docs' {what} is {name!r}; the test stands in for {expected!r}"
        )

    return check


def _tokenizer(chat: bool):
    from adarank.models import build_tokenizer

    tok = build_tokenizer("tiny-bert")
    if chat:
        tok.chat_template = CHATML
        tok.eos_token = "<|endoftext|>"
    return tok


def _patch_hub(ctx, model_id: str, build_model: Callable, chat: bool = False) -> None:
    import transformers

    check = _only(model_id, "model id")

    def tokenizer(name, *args, **kwargs):
        check(name)
        return _tokenizer(chat)

    def model(name, *args, **kwargs):
        check(name)
        return build_model(**kwargs)

    mp = ctx.monkeypatch
    mp.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    for auto in ("AutoModelForSequenceClassification", "AutoModelForCausalLM"):
        mp.setattr(getattr(transformers, auto), "from_pretrained", model)


def _patch_datasets(ctx, dataset_id: str, make: Callable) -> None:
    import datasets

    check = _only(dataset_id, "dataset id")

    def load_dataset(name, *args, split=None, **kwargs):
        check(name)
        data = make()
        return data[split] if split else data

    ctx.monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def _reviews(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    text = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]
    return {"text": text, "label": [int("good" in t or "great" in t) for t in text]}


# ----------------------------------------------------------------------------- Trainer
def _hf_trainer(ctx) -> dict:
    from datasets import Dataset, DatasetDict
    from docs_fixtures import tiny_bert

    _patch_hub(ctx, MINILM, lambda num_labels=2, **_: tiny_bert())
    _patch_datasets(
        ctx,
        ROTTEN_TOMATOES,
        lambda: DatasetDict(
            train=Dataset.from_dict(_reviews(64, 0)),
            validation=Dataset.from_dict(_reviews(16, 1)),
        ),
    )
    return {}


def _check_hf_trainer(ns: dict) -> None:
    from pathlib import Path

    assert ns["trainer"].state.global_step == 4  # 2 epochs × 64 rows / batch 32
    assert ns["callback"].history, "the callback never re-allocated"
    assert Path("runs/rt-trainer/peft/adapter_config.json").is_file()


# ----------------------------------------------------------------------------- TRL
def _trl_sft(ctx) -> dict:
    import pytest
    from datasets import Dataset

    pytest.importorskip("trl")  # in the dev extra; a plain install may lack it

    from adarank.models import build_hf_model

    _patch_hub(ctx, SMOLLM2, lambda **_: build_hf_model("tiny-llama", task="causal_lm"), True)

    def conversations():
        rows = _reviews(24, 2)["text"]
        return {
            "train": Dataset.from_dict(
                {
                    "messages": [
                        [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]
                        for t in rows
                    ]
                }
            )
        }

    _patch_datasets(ctx, CAPYBARA, conversations)
    return {}


def _check_trl_sft(ns: dict) -> None:
    assert ns["trainer"].state.global_step == 3


# ----------------------------------------------------------------------------- resume
def _adapted_bert():
    from docs_fixtures import tiny_bert

    from adarank import add_adapters

    model = tiny_bert(seed=0)
    add_adapters(
        model, ["query", "value", "intermediate.dense"], init_rank=4, scaling=16.0,
        modules_to_save="classifier", seed=0,
    )  # fmt: skip
    return model


def _hf_resume(ctx) -> dict:
    """A run interrupted after its step-3 checkpoint (of 6), to be resumed by the block."""
    from docs_fixtures import classification_examples
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from adarank.integrations.transformers import AdaRankCallback

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3

    train = classification_examples(48)
    args = TrainingArguments(
        output_dir=str(ctx.tmp / "runs" / "hf"), max_steps=6, save_steps=3, logging_steps=1,
        per_device_train_batch_size=8, learning_rate=3e-3, report_to="none", seed=0,
    )  # fmt: skip
    first = Trainer(model=_adapted_bert(), args=args, train_dataset=train, callbacks=[StopAt3()])
    AdaRankCallback(first, budget="0.5%", interval=10)
    first.train()
    assert (ctx.tmp / "runs" / "hf" / "checkpoint-3").is_dir()
    return {"model": _adapted_bert(), "args": args, "train": train}


def _check_hf_resume(ns: dict) -> None:
    assert ns["trainer"].state.global_step == 6


def _hf_llama(ctx) -> dict:
    """The README's short example: a tiny Llama, 4 steps of next-token loss."""
    from transformers import TrainingArguments

    from adarank.models import build_hf_model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 261, (32, 12), generator=g)
    train = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(
        output_dir=str(ctx.tmp / "runs" / "llama"), max_steps=4, per_device_train_batch_size=8,
        learning_rate=3e-3, report_to="none", save_strategy="no",
    )  # fmt: skip
    model = build_hf_model("tiny-llama", task="causal_lm", seed=0)
    return {"model": model, "args": args, "train": train}


def _check_hf_llama(ns: dict) -> None:
    assert ns["trainer"].state.global_step == 4


#: name → (setup, check, substitutions)
HF_FIXTURES: dict[str, tuple] = {
    "hf_trainer": (_hf_trainer, _check_hf_trainer, {}),
    "trl_sft": (
        _trl_sft,
        _check_trl_sft,
        {"max_steps=600": "max_steps=3", "# use_cpu=True,": "use_cpu=True,"},  # CPU-only test
    ),
    "hf_resume": (_hf_resume, _check_hf_resume, {}),
    "hf_llama": (_hf_llama, _check_hf_llama, {}),
}
