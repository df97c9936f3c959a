"""README.md stays true: its two commands come first, and each of its Python examples runs
on its own, as a reader would paste it (a fresh interpreter per block)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_opens_with_the_two_commands():
    blocks = re.findall(r"```\n(.*?)```", README.read_text(), re.S)
    assert blocks[0].strip() == 'pip install -e ".[dev]" && python -m trp demo'
    assert blocks[1].strip() == 'pip install -e ".[dev]" && pytest'


def test_there_are_examples():
    assert len(BLOCKS) >= 8 and sum(b.count("trp.") for b in BLOCKS) > 10


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_each_python_example_runs_alone(index, tmp_path):
    run = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    if run.returncode and "No module named 'torchvision'" in run.stderr:
        pytest.skip("this example uses torchvision, which is not installed")
    assert run.returncode == 0, f"README python block {index} failed alone:\n{BLOCKS[index]}\n{run.stderr[-3000:]}"
