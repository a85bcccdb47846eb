"""The README's examples run as written.

1. Every ```python block of README.md runs in a fresh interpreter (the venv's python, cwd = the repo
   root, a timeout). A block preceded by the line ``<!-- readme-test: skip (reason) -->`` is reported
   as skipped with its reason. A block may be preceded by a hidden prelude that defines what a short
   fragment leaves out (the model, the loader…), shown to nobody but run first::

       <!-- readme-test: prelude
       model = torch.nn.Linear(4, 2)
       -->

2. Every command of the ```bash blocks of the section "The main job" runs as written, in order, in one
   temporary folder, with the venv's ``dpfunc``/``python`` first on PATH. What is NOT the full
   command: ``$DPFUNC_TRAIN_ARGS`` (documented there; appended to every ``dpfunc train`` command line,
   later flags win) shrinks each training to one epoch on a 300-example subset with 20 bootstrap
   resamples, and ``$DPFUNC_EVALUATE_ARGS`` shrinks the bootstrap of ``dpfunc evaluate``; a command in
   :data:`PLAN_ONLY` (ResNet-18 at 64², about a minute even on the subset) is run with ``--dry-run``
   (flags, data, run folder and σ calibration checked; nothing trained); ``make`` commands are
   checked with ``make -n`` (a real ``make train`` builds a fresh venv). The test reports each of these
   departures as it makes them.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 120
#: What ``$DPFUNC_TRAIN_ARGS`` appends to each main-job ``dpfunc train`` command (a smoke-sized run).
SMOKE_TRAIN_ARGS = "--epochs 1 --train-subset 300 --bootstrap 20 --quiet"
#: Commands (matched by a fragment) that are planned with --dry-run instead of trained, and why.
PLAN_ONLY = {"--model resnet18": "ResNet-18-GN at 64x64 needs about a minute even on the smoke subset"}

_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((.+)\)\s*-->\s*$")
_PRELUDE = re.compile(r"<!--\s*readme-test:\s*prelude\s*\n(.*?)-->\s*$", re.S)


def readme_blocks(text: str) -> list[dict]:
    """Fenced blocks of a markdown text: language, code, 1-based line, section heading, skip reason, prelude."""
    blocks, lines, i, section = [], text.splitlines(), 0, ""
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = _FENCE.match(line)
        if m is None:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        before = [ln for ln in lines[max(0, start - 12):start]]
        while before and not before[-1].strip():
            before.pop()
        skip = _SKIP.match(before[-1]) if before else None
        prelude = _PRELUDE.search("\n".join(before) + "\n") if before and before[-1].strip().endswith("-->") else None
        blocks.append({"lang": m.group(1), "code": "\n".join(lines[start + 1:j]) + "\n", "line": start + 1,
                       "section": section, "skip": skip.group(1) if skip else None,
                       "prelude": prelude.group(1) if prelude else ""})
        i = j + 1
    return blocks


def test_block_parser_finds_skips_and_preludes():
    text = ("## A\n<!-- readme-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n"
            "<!-- readme-test: prelude\nm = 2\n-->\n```python\nprint(m)\n```\n```bash\nls\n```\n")
    blocks = readme_blocks(text)
    assert [(b["lang"], b["skip"], b["prelude"].strip(), b["section"]) for b in blocks] == [
        ("python", "needs a GPU", "", "A"), ("python", None, "m = 2", "A"), ("bash", None, "", "A")]


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(MPLBACKEND="Agg", PYTHONUNBUFFERED="1", DPFUNC_PROGRESS="0", **extra)
    return env


def _run(argv, *, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run in its own process group; on timeout kill the whole group (no orphans)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {argv}\n{out[-2000:]}\n{err[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


_PYTHON_BLOCKS = [b for b in readme_blocks(README.read_text()) if b["lang"] == "python"]


@pytest.mark.slow
@pytest.mark.parametrize("block", _PYTHON_BLOCKS, ids=[f"line{b['line']}" for b in _PYTHON_BLOCKS])
def test_readme_python_block_runs(block, tmp_path):
    if block["skip"]:
        pytest.skip(f"README line {block['line']} ({block['section']}): {block['skip']}")
    script = tmp_path / "block.py"
    script.write_text(block["prelude"] + block["code"])
    result = _run([sys.executable, str(script)], cwd=REPO, env=_env(), timeout=BLOCK_TIMEOUT_S)
    assert result.returncode == 0, (f"README line {block['line']} ({block['section']}) failed:\n"
                                    f"{block['code']}\n--- stderr ---\n{result.stderr[-3000:]}")


def main_job_commands(text: str) -> list[str]:
    """The command lines of the bash blocks in the section 'The main job…', comments stripped."""
    commands = []
    for block in readme_blocks(text):
        if block["lang"] == "bash" and block["section"].startswith("The main job"):
            for line in block["code"].splitlines():
                command = line.split(" #", 1)[0].strip()
                if command and not command.startswith("#"):
                    commands.append(command)
    return commands


@pytest.mark.slow
def test_readme_main_job_commands_run_as_written(tmp_path, data_dir):
    from dpfunc.data import _files

    commands = main_job_commands(README.read_text())
    assert len(commands) >= 5 and any(c.startswith("dpfunc train") for c in commands)
    extra = {"DPFUNC_TRAIN_ARGS": SMOKE_TRAIN_ARGS, "DPFUNC_EVALUATE_ARGS": "--bootstrap 20 --quiet"}
    if not (_files.project_data_dir() / _files.PNEUMONIAMNIST_FILENAME).is_file():
        extra["DPFUNC_DATA"] = str(data_dir)  # the data lives elsewhere on this machine: say where, as a user would
    departures, cpu = [], []
    for command in commands:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        argv = shlex.split(command)
        if argv[0] == "make":
            result = _run(["make", "-n", "-C", str(REPO)] + argv[1:], cwd=tmp_path, env=_env(), timeout=60)
            assert result.returncode == 0, (command, result.stderr)
            assert "dpfunc train" in result.stdout or "pytest" in result.stdout, (command, result.stdout)
            departures.append(f"{command}: checked with make -n")
            continue
        reason = next((why for fragment, why in PLAN_ONLY.items() if fragment in command), None)
        env = _env(**extra)
        if reason:
            env["DPFUNC_TRAIN_ARGS"] = SMOKE_TRAIN_ARGS + " --dry-run"
            departures.append(f"{command}: --dry-run ({reason})")
        result = _run(["bash", "-c", command], cwd=tmp_path, env=env, timeout=COMMAND_TIMEOUT_S)
        assert result.returncode == 0, f"{command!r} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        if argv[0] == "dpfunc" and argv[1] in ("train", "evaluate") and not reason and "--dry-run" not in argv:
            eps = re.findall(r"privacy: ε = (\S+)", result.stdout)
            assert eps and (eps[-1] == "∞" or float(eps[-1]) > 0), (command, result.stdout)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((command, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert "cnn-eps3.0-seed0" in runs and "cnn-eps3.0-seed0-2" in runs, runs  # a second `dpfunc train`: a new folder
    print("README main-job commands run with DPFUNC_TRAIN_ARGS=" + repr(SMOKE_TRAIN_ARGS) + "; departures:\n  "
          + "\n  ".join(departures) + "\nCPU seconds per command (user + sys, load-independent):\n  "
          + "\n  ".join(f"{v:6.1f}  {k}" for k, v in cpu) + f"\n  {sum(v for _, v in cpu):6.1f}  in all")


def test_help_examples_are_among_the_executed_readme_commands():
    """`dpfunc --help` shows examples; each must be a README main-job command (run by the test above)."""
    import dpfunc.cli

    examples = dpfunc.cli.__doc__.split("Examples::", 1)[1].split("\n\n", 2)[1]
    lines = [line.split(" #", 1)[0].strip() for line in examples.splitlines() if line.strip()]
    assert lines and set(lines) <= set(main_job_commands(README.read_text())), lines


def test_make_private_says_to_build_the_optimizer_after_fix():
    """The README's bridge snippet once built the optimizer before `model = fix(model)`: make_private
    must then say what to do, not only that a parameter is foreign."""
    import torch

    from dpfunc import Key
    from dpfunc.bridge import fix, make_private

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE fix: holds the old module's parameters
    model = fix(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8).long()))
    with pytest.raises(ValueError, match="fix returns a NEW module, so build the optimizer after it"):
        make_private(model, optimizer, loader, key=Key(0), noise_multiplier=1.0, max_grad_norm=1.0)


def test_make_train_runs_dpfunc_train_with_the_data_lookup(tmp_path):
    """`make train` (README top) is `dpfunc train` plus ARGS; DATA_DIR only when given (else dpfunc's lookup).
    Checked with `make -n`: a real `make train` builds a fresh venv."""
    plain = _run(["make", "-n", "-C", str(REPO), "train"], cwd=tmp_path, env=_env(), timeout=60)
    given = _run(["make", "-n", "-C", str(REPO), "train", "DATA_DIR=/data", "ARGS=--resume"], cwd=tmp_path,
                 env=_env(), timeout=60)
    assert plain.returncode == 0 and given.returncode == 0, (plain.stderr, given.stderr)
    assert re.search(r"dpfunc train\s*$", plain.stdout, re.M), plain.stdout
    assert "dpfunc train --data-dir /data --resume" in given.stdout, given.stdout
