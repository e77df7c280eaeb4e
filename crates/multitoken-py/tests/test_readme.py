"""The README's Python quick start runs as written, from the repository root, and
answers what its comments say."""

import re
import subprocess
import sys

from conftest import ROOT


def test_the_readme_python_example_runs_and_answers():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no python block"
    example = blocks[0]
    done = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    # The first answer is printed with its line; the stream's pieces join on the next.
    assert lines[0] == "Blue.", done.stdout
    assert "triangle" in lines[1].lower(), done.stdout
