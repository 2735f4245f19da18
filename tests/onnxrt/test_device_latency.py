"""Latency on the target device (issue 18): providers as a parameter, latency packs, the standalone
device script, planning from its table, and rank multiples from measurements.

No timing is asserted: plans are compared on the same numbers, or planned on synthetic tables.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError
from fxdecomp.latency_pack import latency_pack
from fxdecomp.layer_spec import layer_spec
from fxdecomp.onnxrt import LayerLatency, benchmark_onnx, open_session, rank_multiple_from_times
from fxdecomp.onnxrt.files import locked
from fxdecomp.onnxrt.table import LatencyTableError

MISSING = "CUDAExecutionProvider"  # not in the CPU build of onnxruntime


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    return model, torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    model, x = _model()
    out = tmp_path_factory.mktemp("pack") / "pack"
    summary = latency_pack(model, (x,), out, methods=["svd", "tucker2"])
    return model, x, out, summary


def _recipe(**plan):
    return fxdecomp.load_recipe("default").with_options(
        plan={"round_to": 1, "replan_tolerance": 0.0, "measure_rounds": 0, "latency_model": "measured", **plan}
    )


def _decisions(result):
    return [(d.name, d.method, d.ranks) for d in result.decisions]


# ---- the standalone script in an environment without torch or fxdecomp -------------------------


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _device_python() -> list[str]:
    """A Python with only onnxruntime and numpy: a venv cached per versions (pip from the configured index).

    If pip cannot install them, an interpreter without site-packages (-S) whose sys.path holds
    links to onnxruntime, numpy and their dependencies only.
    """
    root = Path(os.environ.get("FXDECOMP_TEST_VENV_ROOT", tempfile.gettempdir()))
    venv = root / f"fxdecomp-device-venv-ort{ort.__version__}-numpy{np.__version__}"
    python = venv / "bin" / "python"
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f"{venv.name}.lock"):
        if not (venv / ".ready").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=180, env=_clean_env())
            pins = [f"onnxruntime=={ort.__version__}", f"numpy=={np.__version__}"]
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], timeout=600, env=_clean_env(), capture_output=True)
            if done.returncode == 0:
                (venv / ".ready").touch()
    if (venv / ".ready").exists():
        return [str(python)]
    links = root / f"fxdecomp-device-links-ort{ort.__version__}"
    links.mkdir(exist_ok=True)
    site = Path(ort.__file__).parent.parent
    for name in ("onnxruntime", "numpy", "numpy.libs", "google", "flatbuffers", "packaging"):
        if (site / name).exists() and not (links / name).exists():
            (links / name).symlink_to(site / name)
    return [sys.executable, "-S", "-c", f"import sys, runpy; sys.path[1:1] = [{str(links)!r}]; "
            "script = sys.argv[1]; sys.path.insert(0, script.rsplit('/', 1)[0]); sys.argv = sys.argv[1:]; "
            "runpy.run_path(script, run_name='__main__')"]  # fmt: skip


def _run_device(python, args, cwd):
    return subprocess.run([*python, *args], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300)


def test_device_script_runs_without_torch_and_the_table_plans_like_local_timings(pack, tmp_path, monkeypatch):
    model, x, pack_dir, _ = pack
    python = _device_python()
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib.util as u\nprint([u.find_spec(m) is None for m in ('torch', 'fxdecomp', 'onnxruntime', 'numpy')])\n")
    assert _run_device(python, [str(probe)], tmp_path).stdout.strip() == "[True, True, False, False]"

    table_path = tmp_path / "table.json"
    args = [str(pack_dir / "device_bench.py"), str(pack_dir), "--out", str(table_path), "--runs", "3", "--min-seconds", "0", "-q"]
    done = _run_device(python, args, tmp_path)
    assert done.returncode == 0, done.stderr
    table = json.loads(table_path.read_text())
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    assert table["format"] == "fxdecomp-latency-table" and table["provider"] == "CPUExecutionProvider"
    assert table["onnxruntime"] == ort.__version__ and table["device"]["processor"] and table["threads"] == 1
    assert [e["key"] for e in table["entries"]] == [e["key"] for e in manifest["entries"]]
    assert all(0 < e["min_ms"] <= e["median_ms"] <= e["p90_ms"] for e in table["entries"])

    # The same numbers, recorded as in-process timings: the layer cache, and the whole model's time.
    cache = tmp_path / "cache"
    cache.mkdir()
    timer = LayerLatency(cache_dir=cache)
    stats = ("median_ms", "p10_ms", "p90_ms", "min_ms", "runs")
    records = {timer.key_for(json.loads(e["key"])): {k: e[k] for k in stats} | {"builder": "direct"} for e in table["entries"] if e["file"] != "model.onnx"}
    (cache / "latency.json").write_text(json.dumps(records))
    model_ms = next(e["median_ms"] for e in table["entries"] if e["file"] == "model.onnx")
    import fxdecomp.passes.plan as plan_module

    monkeypatch.setenv("FXDECOMP_CACHE_DIR", str(cache))
    monkeypatch.setattr(plan_module, "model_ms", lambda *a, **k: model_ms)
    monkeypatch.setattr("fxdecomp.latency.model_ms", lambda *a, **k: model_ms)

    layers = {e["what"]["layers"][0]: e["median_ms"] for e in table["entries"] if e["what"].get("method") == "original"}
    fastest = {}
    for e in table["entries"]:
        name = e["what"].get("layers", ["?"])[0]
        if e["what"].get("method", "original") != "original" and name in layers:
            fastest[name] = min(fastest.get(name, math.inf), e["median_ms"])
    saved = sum(max(layers[n] - fastest.get(n, layers[n]), 0.0) for n in layers)
    assert (model_ms - saved) / model_ms < 1  # some option is faster than its layer
    # The plan uses only the options at the rank multiple measured from the table's probes, a subset
    # of the pack: the smallest latency it reaches comes from the planner itself.
    with pytest.raises(fxdecomp.BudgetError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxdecomp.compress(model, (x,), fxdecomp.Budget(latency=0.01), methods=["svd", "tucker2"], pipeline=_recipe(latency_table=str(table_path)))
    reachable = caught.value.smallest_reachable
    assert reachable < 1
    budgets = [fxdecomp.Budget(latency=round((1 + reachable) / 2, 4)), fxdecomp.Budget(flops=0.5)]
    for budget in budgets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # min_efficiency may be out of reach on these tiny layers
            extra = {} if budget.metric == "latency" else {"min_efficiency": 0.9}
            local = fxdecomp.compress(model, (x,), budget, methods=["svd", "tucker2"], pipeline=_recipe(**extra))
            remote = fxdecomp.compress(model, (x,), budget, methods=["svd", "tucker2"], pipeline=_recipe(latency_table=str(table_path), **extra))
        assert _decisions(remote) == _decisions(local)
        assert remote.latency_before_ms == local.latency_before_ms == model_ms
        assert any(d.decomposed for d in remote.decisions)
    assert json.loads((cache / "latency.json").read_text()).keys() == records.keys()  # nothing timed locally


# ---- synthetic tables: the planner's decisions without timing noise ---------------------------------


def _synthetic_table(pack_dir, path, probe_block=1, drop=None):
    """A table over the pack whose times are 1 ms per MB of ONNX file (weights read per run) + 1 us; probes: a staircase."""
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    entries = []
    for entry in manifest["entries"]:
        what = entry["what"]
        if what.get("layers") == ["(rank-multiple probe)"]:
            c = what["input"][1]
            ms = (math.ceil(c / probe_block) * probe_block) ** 2 * 1e-3
        else:
            ms = (pack_dir / entry["file"]).stat().st_size / 1e6 + 0.001
        if drop is not None and drop(entry):
            continue
        entries.append({"key": entry["key"], "file": entry["file"], "what": what, "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "min_ms": ms, "runs": 1})
    table = {
        "format": "fxdecomp-latency-table", "version": 1, "device": {"processor": "synthetic"}, "provider": "CPUExecutionProvider",
        "provider_options": {}, "threads": 1, "onnxruntime": ort.__version__, "protocol": {}, "entries": entries,
    }  # fmt: skip
    path.write_text(json.dumps(table))
    return path


def test_ranks_round_to_the_multiple_the_table_measured(pack, tmp_path, monkeypatch):
    """The table's probe convs step every 16 channels: every rank the plan looks up is then a multiple of 16."""
    from fxdecomp.onnxrt.table import LatencyTable

    model, x, pack_dir, _ = pack
    asked = []
    real = LatencyTable.layer_ms

    def spy(self, spec, shape, method=None, ranks=(), options=None):
        if method is not None and spec.kind == "conv2d" and spec.in_channels >= 32:  # maxima are multiples of 16
            asked.append(tuple(ranks))
        return real(self, spec, shape, method, ranks, options)

    monkeypatch.setattr(LatencyTable, "layer_ms", spy)

    def plan(block):
        asked.clear()
        table = _synthetic_table(pack_dir, tmp_path / f"t{block}.json", probe_block=block)
        result = fxdecomp.compress(model, (x,), fxdecomp.Budget(latency=0.8), methods=["svd", "tucker2"], pipeline=_recipe(latency_table=str(table)))
        return {r for ranks in asked for r in ranks}, result

    by_16, result = plan(16)
    assert by_16 and all(r % 16 == 0 for r in by_16)
    assert any(d.decomposed for d in result.decisions)
    assert result.latency_after_ms < result.latency_before_ms  # the table's prediction
    by_1, _ = plan(1)
    assert any(r % 16 for r in by_1)


def test_a_table_that_misses_an_option_names_layer_method_and_ranks(pack, tmp_path):
    model, x, pack_dir, _ = pack
    lost = {}

    def drop(entry):
        what = entry["what"]
        if not lost and what.get("method") == "svd" and "2" in what["layers"][0]:
            lost.update(what)
            return True
        return False

    table = _synthetic_table(pack_dir, tmp_path / "partial.json", drop=drop)
    with pytest.raises(LatencyTableError) as caught:
        fxdecomp.compress(model, (x,), fxdecomp.Budget(latency=0.8), methods=["svd", "tucker2"], pipeline=_recipe(latency_table=str(table)))
    message = str(caught.value)
    assert f"layer {lost['layers'][0]!r}" in message and "method svd" in message and f"ranks {tuple(lost['ranks'])}" in message


def test_a_table_refuses_a_plan_for_another_provider_or_a_bad_file(pack, tmp_path):
    model, x, pack_dir, _ = pack
    table = _synthetic_table(pack_dir, tmp_path / "t.json")
    with pytest.raises(LatencyTableError, match="measured with"):
        fxdecomp.compress(model, (x,), fxdecomp.Budget(latency=0.8), pipeline=_recipe(latency_table=str(table), latency_threads=2))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LatencyTableError, match="not a latency table"):
        fxdecomp.compress(model, (x,), fxdecomp.Budget(latency=0.8), pipeline=_recipe(latency_table=str(tmp_path / "bad.json")))


def test_the_pack_holds_every_layer_at_its_input_shape_and_the_device_files(pack):
    _, _, pack_dir, summary = pack
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    keys = [e["key"] for e in manifest["entries"]]
    assert len(keys) == len(set(keys)) == summary.layers + summary.probes + 1
    originals = {(e["what"]["layers"][0], tuple(e["what"]["input"])) for e in manifest["entries"] if e["what"].get("method") == "original"}
    assert {("0", (1, 3, 16, 16)), ("2", (1, 32, 16, 16)), ("6", (1, 64)), ("8", (1, 64))} <= originals
    for name in ("device_bench.py", "timing.py", "files.py", "model.onnx"):
        assert (pack_dir / name).is_file()
    with pytest.raises(InvalidInputError, match="not an empty folder"):
        latency_pack(nn.Linear(4, 4), (torch.randn(1, 4),), pack_dir)


# ---- providers ----------------------------------------------------------------------------------


def test_cpu_provider_under_two_settings(tmp_path):
    model, x = _model()
    path = tmp_path / "m.onnx"
    fxdecomp.export_onnx(model, (x,), path)
    one = benchmark_onnx(path, (x,), runs=3, warmup=1, provider="CPUExecutionProvider", threads=1)
    two = benchmark_onnx(path, (x,), runs=3, warmup=1, provider="CPUExecutionProvider", provider_options={"use_arena": "0"}, threads=2)
    assert one.provider == two.provider == "CPUExecutionProvider" and (one.threads, two.threads) == (1, 2)
    assert open_session(path, threads=2).get_session_options().intra_op_num_threads == 2
    spec, shape = layer_spec(nn.Conv2d(8, 8, 3, padding=1)), (1, 8, 8, 8)
    a = LayerLatency(cache_dir=tmp_path, runs=2, warmup=0, min_seconds=0.0)
    b = LayerLatency(cache_dir=tmp_path, runs=2, warmup=0, min_seconds=0.0, provider="CPUExecutionProvider", provider_options={"use_arena": "0"})
    assert json.loads(a.key(spec, shape, None, (), {}))["provider_options"] == {}
    assert json.loads(b.key(spec, shape, None, (), {}))["provider_options"] == {"use_arena": "0"}
    a.layer_ms(spec, shape), b.layer_ms(spec, shape)
    assert a.measurements == b.measurements == 1  # keyed apart: b did not reuse a's record
    assert len(json.loads((tmp_path / "latency.json").read_text())) == 2


def test_a_provider_that_is_not_installed_is_a_clear_error(tmp_path, monkeypatch):
    model, x = _model()
    path = tmp_path / "m.onnx"
    fxdecomp.export_onnx(model, (x,), path)
    available = ort.get_available_providers()
    with pytest.raises(InvalidInputError, match=MISSING) as caught:
        benchmark_onnx(path, (x,), provider=MISSING)
    assert all(name in str(caught.value) for name in available)
    with pytest.raises(InvalidInputError, match="available"):
        LayerLatency(provider=MISSING)
    monkeypatch.setenv("FXDECOMP_CACHE_DIR", str(tmp_path))
    with pytest.raises(InvalidInputError, match=MISSING):
        fxdecomp.compress(model, (x,), fxdecomp.Budget(latency=0.8), pipeline=_recipe(provider=MISSING))
    from fxdecomp.cli import main

    assert main(["bench", str(path), str(path), "--rounds", "2", "--provider", MISSING]) == 2


def test_rank_multiple_comes_from_timings():
    channels = (32, 33, 40, 41, 48, 49, 56, 57, 63, 64)
    for block in (1, 4, 8, 16, 32):
        assert rank_multiple_from_times({c: 0.3 + (math.ceil(c / block) * block) ** 2 * 1e-4 for c in channels}) == block
    assert rank_multiple_from_times({c: 1.0 for c in channels}) == 1  # flat: nothing to round for
    with pytest.raises(InvalidInputError):
        rank_multiple_from_times({32: 1.0})


def test_this_cpus_simd_block_is_no_floor_for_a_device_table(pack, tmp_path, monkeypatch):
    """round_to = 0 (the default) rounds to this CPU's block only when planning for this CPU: with a device table
    whose probes reward no multiple, the plan looks up ranks that are no multiples of this CPU's block."""
    from fxdecomp.onnxrt.table import LatencyTable

    monkeypatch.setattr("fxdecomp.passes.plan.preferred_rank_multiple", lambda threads=1: 16)  # an AVX-512 host
    model, x, pack_dir, _ = pack
    asked = []
    real = LatencyTable.layer_ms

    def spy(self, spec, shape, method=None, ranks=(), options=None):
        if method is not None and spec.kind == "conv2d" and spec.in_channels >= 32:
            asked.extend(ranks)
        return real(self, spec, shape, method, ranks, options)

    monkeypatch.setattr(LatencyTable, "layer_ms", spy)
    table = _synthetic_table(pack_dir, tmp_path / "flat.json", probe_block=1)
    looked_up = []
    for round_to in (0, 1):
        asked.clear()
        fxdecomp.compress(model, (x,), fxdecomp.Budget(latency=0.8), methods=["svd", "tucker2"],
                          pipeline=_recipe(latency_table=str(table), round_to=round_to))
        looked_up.append(sorted(asked))
    assert looked_up[0] and looked_up[0] == looked_up[1]  # the plain grid, as round_to = 1 asks
    assert any(r % 16 for r in looked_up[0])
