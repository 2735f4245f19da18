"""The command line as a user drives it: artifacts, apply, exit codes, help, the HTML report, the demo.

The expensive runs go through a real process (``python -m fxdecomp``); the many
bad-input cases call ``fxdecomp.cli.main`` in-process, which is the same code path
without the 3 s of importing torch each time.
"""

import base64
import html.parser
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxdecomp
from fxdecomp.benchmark import LatencyComparison, LatencyStats
from fxdecomp.cli import main
from fxdecomp.progress import Progress
from fxdecomp.report import render_html
from tests.cli_factory import small_cnn

ROOT = Path(__file__).resolve().parents[2]
FACTORY = "tests.cli_factory:small_cnn"
SHAPE = "1,3,16,16"
COMMANDS = ("compress", "inspect", "export", "bench", "apply", "demo")


def run_cli(*args, cwd, timeout=240):
    # The fxdecomp under test (installed, or this checkout) first; ROOT after it, for tests.cli_factory.
    package_parent = str(Path(fxdecomp.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent, str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "fxdecomp", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def example_input():
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # what --input-shape 1,3,16,16 makes


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """One real `fxdecomp compress` run with every output."""
    folder = tmp_path_factory.mktemp("compress")
    proc = run_cli(
        "compress", FACTORY, "--input-shape", SHAPE, "--budget", "0.5",
        "--out", "model.pt", "--onnx", "model.onnx", "--report", "report.html", "--plan", "plan.json", cwd=folder,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return folder, proc


def _decisions(plan):
    return [(d["name"], d["method"], tuple(d["ranks"])) for d in plan["decisions"]]


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs:
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def parse_html(text):
    page = _Page()
    page.feed(text)
    page.close()
    return page


def assert_self_contained_report(text, decomposed, plots):
    page = parse_html(text)
    assert len(page.images) == plots
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert all(link.startswith("data:") for link in page.links)  # nothing loaded from outside the file
    cells = {t.strip() for t in page.text}
    assert decomposed and set(decomposed) <= cells


# ---- compress: every artifact exists and loads ------------------------------------------------


def test_compress_writes_every_artifact(compressed):
    folder, proc = compressed
    plan = json.loads((folder / "plan.json").read_text())
    decomposed = [d["name"] for d in plan["decisions"] if d["method"] != "keep"]
    assert decomposed and plan["flops_after"] <= 0.5 * plan["flops_before"]
    assert "FLOPs" in proc.stdout and all(name in proc.stdout for name in decomposed)

    gm = torch.load(folder / "model.pt", weights_only=False)
    assert isinstance(gm, torch.fx.GraphModule)
    x = example_input()
    with torch.no_grad():
        got, original = gm(x), small_cnn()(x)
    assert got.shape == (1, 10)
    assert 0 < float((got - original).norm() / original.norm()) < 1  # decomposed, and still close

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(3, 3, 16, 16)
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, gm(batch).numpy(), rtol=1e-3, atol=1e-4)

    assert_self_contained_report((folder / "report.html").read_text(), decomposed, plots=3)
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]  # atomic writes leave no temp files


def test_apply_reproduces_the_plan(compressed):
    folder, _ = compressed
    proc = run_cli(
        "apply", "plan.json", FACTORY, "--input-shape", SHAPE,
        "--out", "again.pt", "--plan", "again.json", "--report", "again.json.report.json", cwd=folder,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first, again = (json.loads((folder / name).read_text()) for name in ("plan.json", "again.json"))
    assert _decisions(again) == _decisions(first)
    assert again["flops_after"] == first["flops_after"] and again["params_after"] == first["params_after"]
    shapes = [{k: tuple(v.shape) for k, v in torch.load(folder / f, weights_only=False).state_dict().items()} for f in ("model.pt", "again.pt")]
    assert shapes[0] == shapes[1]
    report = json.loads((folder / "again.json.report.json").read_text())
    assert _decisions(report) == _decisions(first)


def test_markdown_report_recipe_and_params_budget(tmp_path):
    argv = ["compress", FACTORY, "--input-shape", SHAPE, "--budget", "params:0.6", "--recipe", "fast", "-q"]
    assert main(argv + ["--report", str(tmp_path / "r.md"), "--plan", str(tmp_path / "p.json")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert text.startswith("Budget {'params': 0.6}") and "| layer | op | method |" in text
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["pipeline"] == "fast" and plan["params_after"] <= 0.6 * plan["params_before"]
    assert {m for _, m, _ in _decisions(plan)} <= {"keep", "svd", "spatial_svd", "tucker2"}  # the fast recipe's methods


def test_inputs_file_and_calibration(tmp_path):
    torch.save((example_input(),), tmp_path / "inputs.pt")
    torch.save([(torch.randn(2, 3, 16, 16),) for _ in range(2)], tmp_path / "calib.pt")
    code = main(["compress", FACTORY, "--inputs", str(tmp_path / "inputs.pt"), "--calibration", str(tmp_path / "calib.pt"), "--plan", str(tmp_path / "p.json"), "-q"])
    assert code == 0
    assert json.loads((tmp_path / "p.json").read_text())["decisions"]


# ---- inspect, export, bench -----------------------------------------------------------------


def test_inspect_json_and_table(capsys):
    assert main(["inspect", FACTORY, "--input-shape", SHAPE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [layer["name"] for layer in data["layers"]]
    assert names == ["features.0", "features.3", "classifier.1", "classifier.3"]
    svd = data["layers"][1]["estimates"][0]
    assert svd["method"] == "svd" and 1 <= svd["vbmf"][0] <= svd["max_ranks"][0]
    assert main(["inspect", FACTORY, "--input-shape", SHAPE]) == 0
    table = capsys.readouterr().out
    assert "VBMF" in table and "kept@0.25" in table and "features.3" in table


def test_export_then_bench_counts_flops_like_the_plan(compressed, capsys):
    folder, _ = compressed
    assert main(["export", FACTORY, "--input-shape", SHAPE, "--out", str(folder / "original.onnx")]) == 0
    capsys.readouterr()
    assert main(["bench", str(folder / "original.onnx"), str(folder / "model.onnx"), "--input-shape", SHAPE, "--rounds", "5", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    plan = json.loads((folder / "plan.json").read_text())
    # SmallCNN's FLOPs are all in Conv2d / Linear, so the ONNX count equals fxdecomp's torch count.
    assert bench["original"]["flops"] == plan["flops_before"]
    assert bench["compressed"]["flops"] == plan["flops_after"]
    assert bench["original"]["params"] == plan["params_before"]
    assert bench["efficiency"] == pytest.approx(bench["speedup"] / bench["flop_reduction"])
    assert main(["bench", str(folder / "original.onnx"), str(folder / "model.onnx"), "--rounds", "3"]) == 0  # declared shapes
    table = capsys.readouterr().out
    assert "median latency" in table and "efficiency" in table


# ---- exit codes and error lines ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["compress", FACTORY, "--input-shape", SHAPE, "--budget", "1.5"], "outside (0, 1]"),
        (["compress", FACTORY, "--input-shape", SHAPE, "--budget", "half"], "not a fraction"),
        (["compress", FACTORY, "--input-shape", SHAPE, "--budget", "watts:0.5"], "unknown budget metric"),
        (["compress", "tests.no_such_module:factory", "--input-shape", SHAPE], "cannot import module"),
        (["compress", "tests.cli_factory:no_such_factory", "--input-shape", SHAPE], "has no 'no_such_factory'"),
        (["compress", "tests.cli_factory:not_a_model", "--input-shape", SHAPE], "not a torch.nn.Module"),
        (["compress", "no_such_file.pt", "--input-shape", SHAPE], "no model file"),
        (["compress", FACTORY, "--input-shape", SHAPE, "--methods", "svd,magic"], "unknown method"),
        (["compress", FACTORY, "--input-shape", SHAPE, "--recipe", "no_such_recipe"], "no recipe"),
        (["compress", FACTORY, "--input-shape", "1,3,x"], "bad --input-shape"),
        (["compress", FACTORY, "--input-shape", "1,5,16,16"], "do not fit"),
        (["compress", FACTORY, "--input-shape", SHAPE, "--report", "r.pdf"], "unknown format"),
        (["compress", FACTORY], "required"),
        (["compress", FACTORY, "--input-shape", SHAPE, "--budget", "0.5", "--threads", "0"], "positive integer"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("fxdecomp: error: ") and fragment in lines[0]
    assert all(line.startswith("fxdecomp: ") for line in lines) and len(lines) <= 2
    assert "Traceback" not in err


def test_other_failures_exit_1_and_verbose_shows_the_traceback(capsys):
    assert main(["compress", "tests.cli_factory:broken", "--input-shape", SHAPE]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxdecomp: error: the factory tests.cli_factory:broken raised RuntimeError") and "Traceback" not in err
    assert main(["compress", "tests.cli_factory:broken", "--input-shape", SHAPE, "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_never_overwrites_an_input(tmp_path, capsys):
    model_file = tmp_path / "model.pt"
    torch.save(small_cnn(), model_file)
    inputs = tmp_path / "inputs.pt"
    torch.save(example_input(), inputs)
    before = model_file.read_bytes(), inputs.read_bytes()
    assert main(["compress", str(model_file), "--input-shape", SHAPE, "--out", str(model_file)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["compress", str(model_file), "--inputs", str(inputs), "--plan", str(tmp_path / "." / "inputs.pt")]) == 2
    assert main(["compress", str(model_file), "--inputs", str(inputs), "--out", str(tmp_path / "a.pt"), "--plan", str(tmp_path / "a.pt")]) == 2
    assert main(["export", str(model_file), "--input-shape", SHAPE, "--out", str(model_file)]) == 2
    assert (model_file.read_bytes(), inputs.read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["inputs.pt", "model.pt"]


def test_a_failed_run_writes_no_output(tmp_path):
    assert main(["compress", FACTORY, "--input-shape", SHAPE, "--methods", "magic", "--out", str(tmp_path / "m.pt"), "--plan", str(tmp_path / "p.json")]) == 2
    assert os.listdir(tmp_path) == []


def test_saved_model_file_and_weights(tmp_path, capsys):
    torch.save(small_cnn(), tmp_path / "whole.pt")
    torch.save(small_cnn().state_dict(), tmp_path / "weights.pt")
    assert main(["export", str(tmp_path / "whole.pt"), "--input-shape", SHAPE, "--out", str(tmp_path / "a.onnx"), "-q"]) == 0
    assert main(["export", FACTORY, "--weights", str(tmp_path / "weights.pt"), "--input-shape", SHAPE, "--out", str(tmp_path / "b.onnx"), "-q"]) == 0
    capsys.readouterr()
    # a state_dict given as MODEL, and weights that do not fit the model, are bad input
    assert main(["export", str(tmp_path / "weights.pt"), "--input-shape", SHAPE, "--out", str(tmp_path / "c.onnx")]) == 2
    assert "--weights" in capsys.readouterr().err
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    assert main(["export", FACTORY, "--weights", str(tmp_path / "bad.pt"), "--input-shape", SHAPE, "--out", str(tmp_path / "d.onnx")]) == 2


def test_exit_code_of_the_real_process(tmp_path):
    proc = run_cli("compress", FACTORY, "--input-shape", SHAPE, "--budget", "2", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fxdecomp: error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


# ---- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_ends_with_an_example(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    tail = text[text.rindex("example:") :]
    assert re.search(rf"^  fxdecomp {command} \S", tail, re.M), tail


def test_compress_help_says_how_to_load_and_warns_about_pickles(capsys):
    main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "weights_only=False" in text and "trust" in text and "torch.load('small.pt', weights_only=False)" in text


# ---- the HTML report -------------------------------------------------------------------------


def test_html_report_with_latency_is_self_contained():
    x = example_input()
    result = fxdecomp.compress(small_cnn(), (x,), budget=0.5, methods=["tucker2", "svd"])
    stats = [LatencyStats.from_times([t, t * 1.1, t * 0.9], threads=1) for t in (2.0, 1.2)]
    text = render_html(result, LatencyComparison(stats[0], stats[1], 0.6))
    decomposed = [d.name for d in result.decisions if d.decomposed]
    assert_self_contained_report(text, decomposed, plots=4)
    assert "2.000 ms" in text and "1.200 ms" in text


def test_html_report_when_nothing_is_decomposed():
    result = fxdecomp.compress(small_cnn(), (example_input(),), budget=1.0)
    page = parse_html(render_html(result))
    assert len(page.images) == 1  # FLOPs per layer only: no ranks or errors to plot
    assert "features.0" in {t.strip() for t in page.text}


# ---- the demo ------------------------------------------------------------------------------


def test_demo_runs_offline_and_reports_before_and_after(tmp_path):
    proc = run_cli("demo", "--epochs", "2", "--out-dir", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("test accuracy", "FLOPs (2 x MACs)", "parameters", "median latency (ms)"):
        line = next(l for l in out.splitlines() if l.startswith(row))
        assert len(re.findall(r"\d", line)) >= 2, line
    accuracy = [float(v) for v in re.findall(r"(\d+\.\d)%", next(l for l in out.splitlines() if l.startswith("test accuracy")))]
    assert accuracy[0] > 80 and accuracy[1] > 50
    assert sorted(os.listdir(tmp_path / "out")) == ["compressed.onnx", "original.onnx", "plan.json", "report.html", "report.md"]


# ---- progress and warnings --------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty, quiet, shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_progress_only_on_a_terminal_and_not_quiet(monkeypatch, tty, quiet, shown):
    stream = _Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    progress = Progress.on_terminal(quiet)
    with progress.stage("exporting model.onnx"):
        pass
    progress.note("plan: 0.10 s")
    text = stream.getvalue()
    assert bool(text) == shown
    if shown:
        assert re.fullmatch(r"fxdecomp: exporting model.onnx \.\.\. \d+\.\d s\nfxdecomp:   plan: 0.10 s\n", text), text


def test_fxdecomp_warnings_print_as_one_line_unless_quiet(capsys):
    argv = ["compress", FACTORY, "--input-shape", SHAPE, "--exclude", "*", "--budget", "0.5"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "fxdecomp: warning: the model has every candidate layer excluded" in err and "warnings.warn" not in err
    assert main(argv + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_unreachable_budget_hints_the_smallest_reachable(capsys):
    assert main(["compress", FACTORY, "--input-shape", SHAPE, "--exclude", "features.*", "--budget", "0.01"]) == 2
    error, hint = capsys.readouterr().err.strip().splitlines()
    assert "cannot be reached" in error
    reachable = float(re.search(r"pass --budget ([\d.]+) or more", hint).group(1))
    assert main(["compress", FACTORY, "--input-shape", SHAPE, "--exclude", "features.*", "--budget", str(reachable), "-q"]) == 0


def test_input_files_are_never_modified_whatever_happens(tmp_path, capsys):
    torch.save(small_cnn(), tmp_path / "whole.pt")
    torch.save(small_cnn().state_dict(), tmp_path / "weights.pt")
    torch.save((torch.randn(1, 3, 16, 16),), tmp_path / "inputs.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ok = ["compress", str(tmp_path / "whole.pt"), "--inputs", str(tmp_path / "inputs.pt"), "--budget", "0.5", "-q",
          "--out", str(tmp_path / "small.pt"), "--plan", str(tmp_path / "plan.json")]
    assert main(ok) == 0
    assert main(["compress", FACTORY, "--weights", str(tmp_path / "weights.pt"), "--input-shape", SHAPE, "--budget", "0.001", "-q"]) == 2
    assert main(["compress", str(tmp_path / "whole.pt"), "--inputs", str(tmp_path / "inputs.pt"), "--out", str(tmp_path / "whole.pt"), "-q"]) == 2
    capsys.readouterr()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_distilled_calibration_plans_a_batchnorm_net(tmp_path, monkeypatch):
    made = []
    real = fxdecomp.distilled_batches
    monkeypatch.setattr(fxdecomp, "distilled_batches", lambda *a, **k: made.append(real(*a, **{**k, "steps": 10})) or made[-1])
    code = main(["compress", "tests.cli_factory:bn_cnn", "--input-shape", SHAPE, "--calibration", "distilled", "--plan", str(tmp_path / "p.json"), "-q"])
    plan = json.loads((tmp_path / "p.json").read_text())
    assert code == 0 and plan["flops_after"] <= 0.5 * plan["flops_before"]
    assert len(made) == 1 and made[0][0][0].shape == (8, 3, 16, 16)  # the inputs compress calibrated on


def test_distilled_calibration_is_refused_by_name_without_batchnorm(tmp_path, capsys):
    """--calibration distilled: ZeroQ inputs need BatchNorm statistics; the small CNN has none, and the error says so."""
    code = main(["compress", FACTORY, "--input-shape", SHAPE, "--calibration", "distilled", "--plan", str(tmp_path / "p.json"), "-q"])
    assert code != 0 and "no BatchNorm" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
