"""AdapterSnapshot writes loadable native adapter directories during training."""

from __future__ import annotations

import pytest
import torch
from _tiny import fit_tiny, make_model

from adarank.lightning import AdapterSnapshot
from adarank.modules import adapter_layers, load_adapter, read_adapter_config


def test_snapshots_every_n_steps_and_at_end(tmp_path):
    snap = AdapterSnapshot(tmp_path / "snaps", every_n_steps=4)
    module, _ = fit_tiny(steps=10, callbacks=[snap])
    names = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert names == ["step_0000004", "step_0000008", "step_0000010"]
    final = tmp_path / "snaps" / "step_0000010"
    assert read_adapter_config(final)["metadata"]["step"] == 10
    fresh = make_model()
    load_adapter(fresh, final)
    ranks = {n: la.rank for n, la in adapter_layers(fresh).items()}
    assert ranks == module.controller.ranks()
    x = torch.randn(3, 4, 8)
    module.model.eval()
    assert torch.allclose(fresh(x), module.model(x), atol=1e-6)


def test_snapshot_argument_validation():
    with pytest.raises(ValueError, match="every_n_steps=-2"):
        AdapterSnapshot(every_n_steps=-2)
    with pytest.raises(TypeError, match="every_n_steps"):
        AdapterSnapshot(every_n_steps=2.5)
