"""`adarank fit` on a bf16 tiny Llama: fp32 adapters, allocation, resume, adapter/merged export.

The base is *loaded* in bfloat16 (``model.dtype: bfloat16``) and trained with Lightning's
``bf16-mixed`` precision on the CPU (autocast) with gradient checkpointing; the adapters stay
float32 (``adapter.dtype``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adarank.cli import main

BUDGET = 6000  # tiny-llama: a rank-1 triplet in all 14 modules costs 2062 params; init rank 8

RECIPE = """\
description: "bf16 tiny Llama (test)"
defaults: [model/tiny_llama, data/text_lm, adapter/llama, schedule/adaptive, trainer/cpu,
  logger/default]
seed: 0
model:
  dtype: bfloat16
  gradient_checkpointing: true
adapter:
  budget: {budget}
schedule:
  interval: 2
  total_steps: 12
optimizer:
  lr: 5.0e-3
trainer:
  precision: bf16-mixed
  max_epochs: -1
  max_steps: 6
  val_check_interval: 6
  check_val_every_n_epoch: null
  enable_progress_bar: false
logger:
  wandb: false
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bf16")
    mp = pytest.MonkeyPatch()
    mp.setenv("ADARANK_CACHE_DIR", str(root / "cache"))
    text = root / "t.txt"
    text.write_text("\n\n".join(f"the quick brown fox {i} jumps over the dog" for i in range(80)))
    recipe = root / "bf16_llama.yaml"
    recipe.write_text(RECIPE.format(budget=BUDGET))
    run_dir = root / "run"
    args = [f"run.dir={run_dir}", f"data.train_file={text}", "data.block_size=32"]
    args += ["data.val_size=8", "data.batch_size=4"]
    code = main(["fit", str(recipe), *args])
    assert code == 0
    first = json.loads((run_dir / "summary.json").read_text())
    code = main(["fit", "--resume", str(run_dir), "trainer.max_steps=12"])
    mp.undo()
    assert code == 0
    (run_dir / "first_summary.json").write_text(json.dumps(first))
    return run_dir


def test_trains_and_resumes_with_fp32_adapters_under_the_budget(run: Path) -> None:
    first = json.loads((run / "first_summary.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert first["status"] == "ok" and first["steps"] == 6
    assert summary["status"] == "ok" and summary["steps"] == 12
    assert summary["param_budget"] == BUDGET
    assert summary["adapter_params"] <= BUDGET < 8 * 2062
    assert len(set(summary["ranks"].values())) > 1  # ranks moved away from the uniform init
    with open(run / "budget.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert max(steps) > 6  # allocation continued after the resume
    with safe_open(str(run / "adapter" / "adapter.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if "lora_" in k}
    assert dtypes == {torch.float32}


def test_adapter_and_merged_exports_match_the_unmerged_model(run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from adarank.modules import adapter_layers
    from adarank.runs import load_run

    loaded = load_run(run)
    model = loaded.model
    layers = adapter_layers(model)
    assert all(block.gradient_checkpointing for block in model.model.layers)
    assert {layer.base_weight.dtype for layer in layers.values()} == {torch.bfloat16}
    assert {layer.lora_Q.dtype for layer in layers.values()} == {torch.float32}
    ids = loaded.tokenizer(["the quick brown fox 3 jumps"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
    assert unmerged.dtype == torch.float32 and model.dtype == torch.bfloat16

    from adarank.config.build import build_model
    from adarank.modules import load_adapter, save_adapter

    save_adapter(model, tmp_path / "adapter")
    fresh = build_model(loaded.config)  # the bf16 base again, adapters from the saved files
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits.float(), unmerged)

    out = tmp_path / "merged"
    assert main(["export", str(run), "--format", "merged", "--out", str(out)]) == 0
    merged_model = AutoModelForCausalLM.from_pretrained(out)
    assert merged_model.dtype == torch.bfloat16
    with torch.no_grad():
        merged = merged_model(input_ids=ids).logits.float()
    scale = unmerged.abs().max()
    err = (merged - unmerged).abs().max()
    print(f"bf16 merged vs unmerged: max |Δlogit| {float(err):.4f}, max |logit| {float(scale):.3f}")
    assert err <= 0.03 * scale, (float(err), float(scale))  # bf16 rounding of W0 + ΔW
