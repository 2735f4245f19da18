"""Budget(latency=...): the planner plans on onnxruntime measurements of each layer and option."""

import json

import torch

def test_latency_budget_plans_on_measurements(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDECOMP_CACHE_DIR", str(tmp_path))
    import fxdecomp
    from tests.models import VGG

    torch.manual_seed(0)
    model, x = VGG(widths=(32, "M", 64, "M", 64)).eval(), torch.randn(1, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=fxdecomp.Budget(latency=0.8), methods=["svd", "tucker2"])
    assert result.budget == {"latency": 0.8}
    assert result.latency_before_ms > 0 and result.latency_after_ms > 0
    assert any(d.decomposed for d in result.decisions)
    assert (tmp_path / "latency.json").exists()
    assert '"latency_before_ms"' in json.dumps(result.to_dict())
