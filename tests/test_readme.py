"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        if "out/demo" in code:  # needs the quick start's run: tests/test_inference.py runs it
            continue
        exec(compile(code, str(README), "exec"), {})


def test_readme_states_two_commands():
    text = README.read_text()
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        assert marker in text
        block = text.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
        assert block.count("\n") == 0 and "pip install" in block, block
