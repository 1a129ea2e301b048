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


def test_snapshot_with_a_cached_fingerprint_never_gathers_the_base(tmp_path, monkeypatch):
    """A sharded base would need every process to gather it for ``save_adapter``'s fingerprint;
    with the fingerprint cached on the module (taken before sharding), no gather happens and the
    file records exactly the cached fingerprint, which still matches a fresh base."""
    import contextlib

    import adarank.lightning.snapshot as snapshot_mod
    from adarank.lightning.checkpointing import base_fingerprint_of
    from adarank.modules.base_fingerprint import base_fingerprint

    entered = []

    @contextlib.contextmanager
    def spy(model):
        entered.append(model)
        yield

    monkeypatch.setattr(snapshot_mod, "gathered", spy)
    snap = AdapterSnapshot(tmp_path / "snaps", every_n_steps=0)
    module, _ = fit_tiny(steps=10, callbacks=[snap])
    assert entered  # no cached fingerprint during that fit: the gathering path was used
    cached = base_fingerprint_of(module)
    entered.clear()
    snap.saved_steps.clear()
    path = snap.save(module.trainer, module)
    assert not entered and path is not None
    record = read_adapter_config(path)["base_fingerprint"]
    assert record == cached == base_fingerprint(module.model, list(adapter_layers(module.model)))
    load_adapter(make_model(), path)  # the fingerprint check passes on a fresh base
