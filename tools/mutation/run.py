"""Mutation testing of the core modules with mutmut 3, in a scratch copy of the checkout.

Usage (from the repository root)::

    python tools/mutation/run.py cost                 # one module of MODULES below (its sample, resumable)
    python tools/mutation/run.py vbmf --sample 0      # every mutant, not a sample
    python tools/mutation/run.py vbmf --recheck       # run the survivors again (after adding tests)
    python tools/mutation/run.py --report             # the per-module table -> tools/mutation/REPORT.md
    python tools/mutation/run.py --list               # the modules, their files and tests
    python tools/mutation/run.py fxdecomp/ranks.py --tests tests/decomposers/test_decompose.py   # any file

The checkout's tracked and untracked-but-not-ignored files are copied into a
scratch folder (``--workdir``, default ``$TMPDIR/fxdecomp-mutation/<module>``,
kept between runs so that a capped run resumes), a ``setup.cfg`` with the
``[mutmut]`` section is written there, and ``mutmut run`` runs there: nothing
in the checkout is changed. Only the module's own files are mutated and only its
tests run (plus ``test_mutants_<module>.py`` in the module's tests/ folder, the tests written to kill its
survivors); mutmut then runs, for each mutant, only the tests that call the
mutated function.

Sampling: a module's mutants are ranked by the SHA-1 of their mutmut name
(``fxdecomp.cost.x_count_flops__mutmut_12``) and the first ``--sample`` of them
are run (default ``SAMPLE``; 0 runs all). The sample is deterministic: it depends
only on the source (which fixes the names), not on the run, the machine or the
order of the files.

Each run writes ``tools/mutation/results/<module>.json`` (every sampled mutant's
status and the source's hash). ``tools/mutation/equivalent.toml`` names the
survivors that cannot change behaviour, each with the reason and the mutated
line; ``--report`` joins the two into the table (mutants, killed, survived,
equivalent, timeout, % killed of non-equivalent; a timeout counts as killed)
and flags any result whose source has changed since it was measured.

Not in CI: a module's sample takes 5-20 minutes on 2 cores.
Source: mutmut 3 (https://github.com/boxed/mutmut), configuration through setup.cfg.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EQUIVALENT = HERE / "equivalent.toml"
REPORT = HERE / "REPORT.md"
SAMPLE = 30


@dataclass(frozen=True)
class Target:
    files: tuple[str, ...]  # mutated, relative to the repository root
    tests: tuple[str, ...]  # pytest node ids or files that cover them (a fast subset)


def _compress(*names: str) -> tuple[str, ...]:
    return tuple(f"tests/test_compress.py::test_{t}" for t in names)


def _budget(*ids: str) -> tuple[str, ...]:
    return tuple(f"tests/test_compress.py::test_models_meet_the_budget[{i}]" for i in ids)


# Lean test selections: a survivor runs every selected test that calls the mutated function, so whole
# integration files (tests/test_compress.py takes minutes) would make one mutant cost minutes.
MODULES: dict[str, Target] = {
    "cost": Target(("fxdecomp/cost.py",), ("tests/test_cost.py",)),
    "vbmf": Target(("fxdecomp/vbmf.py",), ("tests/test_vbmf.py",)),
    "verify": Target(
        ("fxdecomp/passes/verify.py",),
        _compress("budget_one_changes_nothing", "output_error_is_the_largest_relative_l2_error_over_float_outputs")
        + _budget("0.5-vgg"),
    ),
    "rewrite": Target(
        ("fxdecomp/graph/rewrite.py", "fxdecomp/passes/rewrite.py"),
        _compress("submodules_named_after_the_original_with_provenance", "module_called_twice_is_decomposed_once",
                  "functional_forms_become_candidates_and_lose_their_weights", "saved_plan_reapplies_the_same_structure")
        + _budget("0.5-resnet", "0.5-shared", "0.5-functional"),
    ),
    "planning": Target(
        tuple(f"fxdecomp/planning/{m}.py" for m in ("solver", "grid", "search", "budget", "damage", "replay", "factors",
                                                     "sensitivity", "latency")) + ("fxdecomp/passes/plan.py",),
        ("tests/planning/test_planner.py", "tests/passes/test_pass_manager.py", "tests/planning/test_latency_budget.py",
         "tests/planning/test_fast_default.py", "tests/planning/test_signal_share.py")
        + _compress("unreachable_budget_names_the_smallest", "parameter_budget", "bad_budgets", "exclude_and_report",
                    "saved_plan_reapplies_the_same_structure", "same_inputs_same_plan")
        + _budget("0.5-vgg", "0.3-mobilenetv2"),
    ),
    "factorize": Target(
        tuple(f"fxdecomp/factorize/{m}.py" for m in ("svd", "tucker", "tt", "cp")),
        ("tests/decomposers/test_decompose.py", "tests/factorize/test_cp.py", "tests/test_calibration.py"),
    ),
    "decomposers": Target(
        tuple(f"fxdecomp/decomposers/{m}.py" for m in ("base", "svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd")),
        ("tests/decomposers/test_decompose.py", "tests/test_cost.py", "tests/factorize/test_cp.py", "tests/decomposers/test_conv_kinds.py",
         "tests/decomposers/test_fitted_methods.py", "tests/decomposers/test_tiling.py"),  # the fitted paths
    ),
    "export": Target(
        ("fxdecomp/export.py",),
        tuple(f"tests/test_export.py::test_{t}" for t in (
            "decomposed_conv_parity[svd]", "decomposed_conv_parity[tucker2-reflect]", "decomposed_conv_parity[cp-circular]",
            "decomposed_conv_parity[spatial-stride2]", "decomposed_linear_parity[tt]", "same_padding_with_dilation_uses_explicit_pads",
            "small_cnn_dynamic_batch", "input_module_unchanged", "mixed_modes_and_hooks_restored", "node_names_contain_module_paths",
            "parity_failure_raises_and_keeps_target", "parity_catches_an_error_just_above_the_tolerance", "impossible_tolerance_raises",
            "fixed_batch", "external_data_and_names", "export_failure_is_wrapped", "fixed_batch_model_needs_dynamic_batch_off",
            "export_prints_nothing", "bad_export_arguments", "latency_stats", "compare_latency", "benchmark_bad_inputs")),
    ),
    "training": Target(
        tuple(f"fxdecomp/training/{m}.py" for m in ("deeptwist", "factorized", "finetune", "distill", "reconstruct",
                                                     "plan", "data")),
        ("tests/training/test_training.py",),
    ),
}

STATUS_LINE = re.compile(r"^\s*(\S+):\s*(.+?)\s*$")
GENERATE = """
import os
from mutmut.__main__ import create_mutants
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir
os.makedirs("mutants", exist_ok=True)
copy_src_dir()
copy_also_copy_files()
create_mutants(1)
"""


def checkout_files(root: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore (the working tree as it is)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def source_hash(files: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


# Where each module's mutant-killing tests live (tests/ mirrors the package; cost and vbmf are top-level modules).
OWN_TEST_FOLDERS = {"factorize": "factorize", "planning": "planning", "rewrite": "graph", "training": "training", "verify": "passes", "decomposers": "decomposers", "export": ""}


def own_tests(module: str) -> str:
    folder = OWN_TEST_FOLDERS.get(module, "")
    return f"tests/{folder + '/' if folder else ''}test_mutants_{module}.py"


def make_scratch(root: Path, workdir: Path, module: str, files: tuple[str, ...]) -> None:
    stamp = workdir / ".source_hash"
    if stamp.exists() and stamp.read_text() != source_hash(files):
        shutil.rmtree(workdir / "mutants", ignore_errors=True)  # the source changed: old mutants and verdicts are stale
    for name in checkout_files(root):
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    placeholder = workdir / own_tests(module)
    if not placeholder.exists():  # listed in every run's selection, so adding it later keeps mutmut's verdicts
        placeholder.write_text('"""No tests yet."""\n')
    stamp.write_text(source_hash(files))


def write_config(workdir: Path, target: Target) -> None:
    def lines(values):
        return "".join(f"\n    {v}" for v in values)

    (workdir / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths = fxdecomp\n"
        f"only_mutate ={lines(target.files)}\n"
        "also_copy =\n    passes\n    tools\n"
        f"pytest_add_cli_args_test_selection ={lines(target.tests)}\n"
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -n\n    0\n    -x\n    -q\n"
        "use_git_change_detection = false\n"
    )
    # mutmut reads [tool.mutmut] from pyproject.toml first; the scratch copy's has none, so setup.cfg rules.


def statuses(workdir: Path, env: dict) -> dict[str, str]:
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=workdir, env=env, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        match = STATUS_LINE.match(line)
        if match and "__mutmut_" in match.group(1):
            found[match.group(1)] = match.group(2)
    return found


def sample(names, size: int) -> list[str]:
    ranked = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    return sorted(ranked if size <= 0 else ranked[:size])


def diff_of(workdir: Path, env: dict, name: str) -> str:
    out = subprocess.run(["mutmut", "show", name], cwd=workdir, env=env, capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines()[1:] if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))


def load_equivalent() -> dict[str, dict[str, str]]:
    return tomllib.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}


def run_module(name: str, target: Target, args, env: dict) -> int:
    target = Target(target.files, target.tests + (own_tests(name),))
    workdir = args.workdir or Path(tempfile.gettempdir()) / "fxdecomp-mutation" / name
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    if workdir.resolve().is_relative_to(ROOT):
        raise SystemExit("the scratch folder must lie outside the checkout")
    make_scratch(ROOT, workdir, name, target.files)
    write_config(workdir, target)
    subprocess.run([sys.executable, "-c", GENERATE], cwd=workdir, env=env, check=True, capture_output=True)
    before = statuses(workdir, env)
    chosen = sample(before, args.sample)
    rerun = {"survived", "no tests", "suspicious", "segfault"} if args.recheck else set()
    todo = [m for m in chosen if before[m] == "not checked" or before[m] in rerun]
    print(f"scratch copy: {workdir}\nmutating: {' '.join(target.files)}\ntests: {' '.join(target.tests)}\n"
          f"{len(before)} mutants, sample of {len(chosen)}, {len(todo)} to run", flush=True)
    start = time.monotonic()
    capped = False
    if todo:
        log = workdir / "mutmut.log"  # mutmut's progress spinner, kept out of the terminal
        with log.open("w") as out:
            # Its own process group: at the cap, mutmut and the mutant runs it forked all stop.
            process = subprocess.Popen(["nice", "-n", "5", "mutmut", "run", "--max-children", str(args.max_children), *todo],
                                       cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                process.wait(timeout=args.minutes * 60)
            except subprocess.TimeoutExpired:
                capped = True
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        text = log.read_text(errors="replace")
        if "Failed to run clean test" in text or "Traceback" in text:
            print(text[-4000:])
            if "Failed to run clean test" in text:
                print("the module's tests fail without any mutant: fix them first")
                return 1
    after = statuses(workdir, env)
    result = {m: after[m] for m in chosen}
    survivors = [m for m, s in result.items() if s in ("survived", "no tests")]
    record = {
        "module": name, "files": list(target.files), "tests": list(target.tests), "source_hash": source_hash(target.files),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "mutants_total": len(after), "sample": args.sample, "statuses": result,
        "diffs": {m: diff_of(workdir, env, m) for m in survivors},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    counts: dict[str, int] = {}
    for s in result.values():
        counts[s] = counts.get(s, 0) + 1
    print(f"\n{name}: {len(result)} of {len(after)} mutants" + "".join(f", {v} {k}" for k, v in sorted(counts.items()))
          + f" ({time.monotonic() - start:.0f} s{', capped: partial run' if capped else ''})")
    equivalent = load_equivalent().get(name, {})
    for m in survivors:
        tag = "  (equivalent)" if m in equivalent else ""
        print(f"  {result[m]}: {m}{tag}")
        if args.diffs:
            print("    " + record["diffs"][m].replace("\n", "\n    "))
    return 0


def report() -> str:
    equivalent = load_equivalent()
    rows = ["| module | mutants (sampled / all) | killed | timeout | survived | equivalent (rounding-level) | not run "
            "| % killed of non-equivalent | % counting rounding-level as survived |",
            "|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    explained: list[str] = []
    for name in MODULES:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            rows.append(f"| {name} | not run | | | | | | | |")
            continue
        record = json.loads(path.read_text())
        st = record["statuses"]
        eq = {m for m in equivalent.get(name, {}) if m in st and st[m] in ("survived", "no tests")}
        killed = sum(s == "killed" for s in st.values())
        timeout = sum(s == "timeout" for s in st.values())
        survived = [m for m, s in st.items() if s in ("survived", "no tests", "suspicious", "segfault") and m not in eq]
        not_run = sum(s in ("not checked", "skipped") for s in st.values())
        rounding = {m for m in eq if equivalent[name][m].startswith("Rounding-level")}
        judged = killed + timeout + len(survived)
        pct = f"{100 * (killed + timeout) / judged:.1f} %" if judged else "-"
        strict = f"{100 * (killed + timeout) / (judged + len(rounding)):.1f} %" if judged + len(rounding) else "-"
        stale = "" if record["source_hash"] == source_hash(tuple(record["files"])) else " (source changed since)"
        rows.append(f"| {name}{stale} | {len(st)} / {record['mutants_total']} | {killed} | {timeout} | {len(survived)} | "
                    f"{len(eq)} ({len(rounding)}) | {not_run} | {pct} | {strict} |")
        for m in survived:
            notes.append(f"- `{m}`: `{_last_line(record['diffs'].get(m, ''))}`")
        for m in sorted(eq):
            explained.append(f"- `{m}`: `{_last_line(record['diffs'].get(m, ''))}`: {' '.join(equivalent[name][m].split())}")
    sample_line = (f"Each module's mutants are ranked by SHA-1 of the mutmut name and the first {SAMPLE} are run "
                   "(tools/mutation/run.py, `--sample`); a timeout counts as killed; equivalent mutants "
                   "(tools/mutation/equivalent.toml, each with its reason) leave the denominator; 'rounding-level' ones change "
                   "only floating-point rounding, and the last column counts them as survivors. 'not run': sampled "
                   "mutants a capped run did not reach (resume with the same command).")
    text = "# Mutation testing of the core modules\n\n" + sample_line + "\n\n" + "\n".join(rows) + "\n"
    if notes:
        text += "\nSurvivors not yet killed or explained:\n\n" + "\n".join(notes) + "\n"
    if explained:
        text += "\nEquivalent mutants (they cannot change behaviour):\n\n" + "\n".join(explained) + "\n"
    return text


def _last_line(diff: str) -> str:
    return diff.splitlines()[-1].strip() if diff else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="*", help="names from --list, or a path to a .py file under fxdecomp/")
    parser.add_argument("--tests", nargs="+", help="pytest files or node ids to run (default: the module's)")
    parser.add_argument("--sample", type=int, default=SAMPLE, help="mutants per module, ranked by SHA-1 of the name (0: all)")
    parser.add_argument("--recheck", action="store_true", help="run the sample's survivors again")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock cap of the mutmut run")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (the machine is shared)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: $TMPDIR/fxdecomp-mutation/<module>)")
    parser.add_argument("--fresh", action="store_true", help="start the scratch folder over")
    parser.add_argument("--diffs", action="store_true", help="print the diff of every survivor")
    parser.add_argument("--report", action="store_true", help=f"write the per-module table to {REPORT.relative_to(ROOT)}")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    args = parser.parse_args(argv)
    if args.report:
        text = report()
        REPORT.write_text(text)
        print(text)
        return 0
    if args.list or not args.module:
        for name, t in MODULES.items():
            print(f"{name:12} {' '.join(t.files)}\n{'':12} tests: {' '.join(t.tests)}")
        return 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the mutants/ copy must be the one imported
    # Fewer, derandomized hypothesis examples (tests/conftest.py): the same examples for every mutant.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HYPOTHESIS_PROFILE="mutation")
    code = 0
    for module in args.module:
        if module in MODULES:
            name, target = module, MODULES[module]
        elif module.endswith(".py") and (ROOT / module).is_file():
            name, target = Path(module).stem, Target((module,), tuple(args.tests or ()))
        else:
            parser.error(f"unknown module {module!r}; known: {', '.join(MODULES)} or a path to a .py file")
        if args.tests:
            target = Target(target.files, tuple(args.tests))
        if not target.tests:
            parser.error("give the tests to run with --tests")
        code |= run_module(name, target, args, env)
    return code


if __name__ == "__main__":
    sys.exit(main())
