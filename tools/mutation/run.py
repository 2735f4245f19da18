"""Mutation testing of one core module with mutmut 3, in a scratch copy of the checkout.

Usage (from the repository root)::

    python tools/mutation/run.py cost                # one module of MODULES below
    python tools/mutation/run.py vbmf --minutes 10   # cap the mutmut run (default 15 min)
    python tools/mutation/run.py --list              # the modules and the tests run for each
    python tools/mutation/run.py fxdecomp/ranks.py --tests tests/test_decompose.py   # any file

The checkout's tracked and untracked-but-not-ignored files are copied into a
scratch folder (``--workdir``, default a fresh temporary one), a ``setup.cfg``
with the ``[mutmut]`` section is written there, and ``mutmut run`` runs there:
nothing in the checkout is changed and ``mutants/`` never appears in it.
Only the module's own file(s) are mutated, and only the module's tests run;
mutmut's per-function test selection then runs, for each mutant, only the tests
that call the mutated function. The summary (mutants, killed, survived, timeouts,
not checked) is printed, and the survivors are listed with ``mutmut show`` diffs
(``--diffs``). Keep the scratch folder (``--keep``) to inspect survivors with
``cd DIR && mutmut show NAME``.

Not in CI: a module takes 5-30 minutes on 2 cores.
Source: mutmut 3 (https://github.com/boxed/mutmut), configuration through setup.cfg.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Target:
    files: tuple[str, ...]  # mutated, relative to the repository root
    tests: tuple[str, ...]  # pytest node ids or files that cover them (a fast subset)


MODULES: dict[str, Target] = {
    "cost": Target(("fxdecomp/cost.py",), ("tests/test_cost.py",)),
    "vbmf": Target(("fxdecomp/vbmf.py",), ("tests/test_vbmf.py",)),
    "factorize_svd": Target(("fxdecomp/factorize/svd.py",), ("tests/test_decompose.py", "tests/test_calibration.py")),
    "decomposers_svd": Target(("fxdecomp/decomposers/svd.py",), ("tests/test_decompose.py", "tests/test_cost.py")),
    "verify": Target(
        ("fxdecomp/passes/verify.py",),
        ("tests/test_compress.py::test_models_meet_the_budget", "tests/test_compress.py::test_budget_one_changes_nothing"),
    ),
    "rewrite": Target(
        ("fxdecomp/graph/rewrite.py",),
        tuple(f"tests/test_compress.py::test_{t}" for t in (
            "models_meet_the_budget", "submodules_named_after_the_original_with_provenance",
            "module_called_twice_is_decomposed_once", "functional_forms_become_candidates_and_lose_their_weights",
            "saved_plan_reapplies_the_same_structure")),
    ),
    "planner": Target(("fxdecomp/planning/solver.py",), ("tests/test_planner.py",)),
    "plan": Target(
        tuple(f"fxdecomp/planning/{m}.py" for m in ("grid", "search", "budget", "damage", "replay")) + ("fxdecomp/passes/plan.py",),
        ("tests/test_compress.py", "tests/test_planner.py", "tests/test_pass_manager.py"),
    ),
    "export": Target(("fxdecomp/export.py",), ("tests/test_export.py",)),
    "training": Target(
        ("fxdecomp/training/deeptwist.py", "fxdecomp/training/factorized.py", "fxdecomp/training/finetune.py"),
        ("tests/test_training.py",),
    ),
    "decomposers": Target(
        tuple(f"fxdecomp/decomposers/{m}.py" for m in ("base", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd")),
        ("tests/test_decompose.py", "tests/test_cost.py", "tests/test_cp.py", "tests/test_conv_kinds.py"),
    ),
    "factorize": Target(
        tuple(f"fxdecomp/factorize/{m}.py" for m in ("tucker", "tt", "cp")),
        ("tests/test_decompose.py", "tests/test_cp.py"),
    ),
}

STATUS_LINE = re.compile(r"^\s*(\S+):\s*(.+?)\s*$")


def checkout_files(root: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore (the working tree as it is)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def make_scratch(root: Path, workdir: Path) -> None:
    for name in checkout_files(root):
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def write_config(workdir: Path, target: Target) -> None:
    def lines(values):
        return "".join(f"\n    {v}" for v in values)

    (workdir / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths = fxdecomp\n"
        f"only_mutate ={lines(target.files)}\n"
        "also_copy =\n    passes\n    tools\n"
        f"pytest_add_cli_args_test_selection ={lines(target.tests)}\n"
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -x\n    -q\n"
        "use_git_change_detection = false\n"
    )
    # mutmut reads [tool.mutmut] from pyproject.toml first; the scratch copy's has none, so setup.cfg rules.


def summarise(workdir: Path, env: dict) -> dict[str, list[str]]:
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=workdir, env=env, capture_output=True, text=True).stdout
    by_status: dict[str, list[str]] = {}
    for line in out.splitlines():
        match = STATUS_LINE.match(line)
        if match and "__mutmut_" in match.group(1):
            by_status.setdefault(match.group(2), []).append(match.group(1))
    return by_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="a name from --list, or a path to a .py file under fxdecomp/")
    parser.add_argument("--tests", nargs="+", help="pytest files or node ids to run (default: the module's)")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock cap of the mutmut run")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutant runs (the machine is shared)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--diffs", action="store_true", help="print the diff of every survivor")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    args = parser.parse_args(argv)
    if args.list or not args.module:
        for name, t in MODULES.items():
            print(f"{name:16} {' '.join(t.files)}\n{'':16} tests: {' '.join(t.tests)}")
        return 0
    if args.module in MODULES:
        target = MODULES[args.module]
    elif args.module.endswith(".py") and (ROOT / args.module).is_file():
        target = Target((args.module,), tuple(args.tests or ()))
    else:
        parser.error(f"unknown module {args.module!r}; known: {', '.join(MODULES)} or a path to a .py file")
    if args.tests:
        target = Target(target.files, tuple(args.tests))
    if not target.tests:
        parser.error("give the tests to run with --tests")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"fxdecomp-mutation-{Path(target.files[0]).stem}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if workdir.resolve().is_relative_to(ROOT):
        parser.error("the scratch folder must lie outside the checkout")
    make_scratch(ROOT, workdir)
    write_config(workdir, target)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the mutants/ copy must be the one imported
    # Fewer, derandomized hypothesis examples (tests/conftest.py): the same examples for every mutant.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HYPOTHESIS_PROFILE="mutation")
    print(f"scratch copy: {workdir}\nmutating: {' '.join(target.files)}\ntests: {' '.join(target.tests)}", flush=True)
    start = time.monotonic()
    log = workdir / "mutmut.log"  # mutmut's progress spinner, kept out of the terminal
    with log.open("w") as out:
        # Its own process group: at the cap, mutmut and the mutant runs it forked all stop.
        process = subprocess.Popen(["mutmut", "run", "--max-children", str(args.max_children)], cwd=workdir, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=args.minutes * 60)
            capped = False
        except subprocess.TimeoutExpired:
            capped = True
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if "Failed to run clean test" in log.read_text(errors="replace"):
        print(log.read_text(errors="replace")[-4000:])
        print("the module's tests fail without any mutant: fix them first")
        return 1
    by_status = summarise(workdir, env)
    total = sum(len(v) for v in by_status.values())
    killed = len(by_status.get("killed", []))
    survived = by_status.get("survived", [])
    print(f"\n{' '.join(target.files)}: {total} mutants, {killed} killed, {len(survived)} survived"
          + "".join(f", {len(v)} {k}" for k, v in sorted(by_status.items()) if k not in ("killed", "survived"))
          + f" ({time.monotonic() - start:.0f} s{', capped: partial run' if capped else ''})")
    for name in survived:
        print(f"  survived: {name}")
        if args.diffs:
            diff = subprocess.run(["mutmut", "show", name], cwd=workdir, env=env, capture_output=True, text=True).stdout
            print("    " + diff.strip().replace("\n", "\n    "))
    if args.keep or args.workdir:
        print(f"kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
