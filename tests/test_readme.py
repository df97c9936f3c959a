"""README.md stays true: its two commands come first, and its Python examples run."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_opens_with_the_two_commands():
    blocks = re.findall(r"```\n(.*?)```", README.read_text(), re.S)
    assert blocks[0].strip() == 'pip install -e ".[dev]" && python -m trp demo'
    assert blocks[1].strip() == 'pip install -e ".[dev]" && pytest'


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write files
    code = "\n".join(re.findall(r"```python\n(.*?)```", README.read_text(), re.S))
    assert code.count("trp.") > 5
    exec(compile(code, str(README), "exec"), {})
