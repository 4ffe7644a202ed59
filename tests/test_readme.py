"""The README's python code blocks are code: each runs, as written, in a fresh interpreter with
JAX's default settings (a user's, not the tests' strict ones), so the documentation cannot
drift from the code. The blocks run concurrently; each test waits for its own."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
TIMEOUT_S = 300


def test_the_readme_has_python_blocks_and_the_two_setup_commands():
    assert len(BLOCKS) >= 3
    assert "python3 -m pip install -e . && python3 -m fbp train" in README
    assert "python3 -m pip install -e '.[test]' && python3 -m pytest -q" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci  # CI runs the README's test command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    procs = []
    for i, code in enumerate(BLOCKS):
        cwd = tmp_path_factory.mktemp(f"block{i}")
        (cwd / "block.py").write_text(code)
        log = open(cwd / "out.txt", "w")
        procs.append(
            (subprocess.Popen([sys.executable, "block.py"], cwd=cwd, stdout=log,
                              stderr=subprocess.STDOUT), log, cwd)
        )  # fmt: skip
    results = []
    try:
        for proc, log, cwd in procs:
            try:
                code = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = None
            log.close()
            results.append((code, (cwd / "out.txt").read_text()))
    finally:
        for proc, log, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return results


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(runs, index):
    code, out = runs[index]
    assert code == 0, f"README python block {index} failed ({code}):\n{BLOCKS[index]}\n---\n{out}"


def test_the_ten_line_example_prints_an_ok_report(runs):
    index = next(i for i, b in enumerate(BLOCKS) if "check_grads" in b)
    code, out = runs[index]
    assert code == 0 and "Gradient check of serial(" in out
    assert out.rstrip().splitlines()[-1].startswith("OK:")


def test_the_training_example_reaches_97_percent(runs):
    index = next(i for i, b in enumerate(BLOCKS) if "train.fit(" in b)
    code, out = runs[index]
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", out).group(1))
    assert code == 0 and accuracy >= 0.97, out
