"""The README as a newcomer meets it: CI runs exactly its two set-up commands in a fresh virtualenv, and its Python
example runs as printed."""

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import needs
from vtprune.eval.catalog import is_available

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _ci_commands() -> tuple[list[str], list[str]]:
    """(.ci/run's command lines before the first README command, the lines after a `# README:` comment)."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()]
    tagged = [lines[i + 1] for i, ln in enumerate(lines) if ln.startswith("# README:")]
    first = lines.index(tagged[0])
    before = [ln for ln in lines[:first] if not ln.startswith("#")]
    after = [ln for ln in lines[first:] if not ln.startswith("#")]
    assert after == tagged, "nothing but the README's commands may run once they start"
    return before, tagged


def test_ci_runs_the_readme_commands_in_a_fresh_venv():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)
    assert len(commands) == 2, commands
    before, readme_lines = _ci_commands()
    assert readme_lines == commands
    venv = next(i for i, ln in enumerate(before) if re.fullmatch(r'python3 -m venv "\$(\w+)"', ln))
    name = re.fullmatch(r'python3 -m venv "\$(\w+)"', before[venv]).group(1)
    assert f'source "${name}/bin/activate"' in before[venv + 1 :], "the README commands must run inside the venv"
    assert "--system-site-packages" not in " ".join(before)


@needs(is_available("llava-tiny-sortofclevr"), "the embedded LLaVA model's weights are missing")
def test_readme_python_example_runs(tmp_path):
    example = re.findall(r"```python\n(.+?)\n```", README, flags=re.S)[0]
    assert "load_embedded(" in example and "processor(" in example and "remove_pruner" in example
    check = (
        "\nfrom vtprune.api import _ATTR\n"  # and the model is the stock one again
        "assert getattr(model, _ATTR, None) is None and not model._forward_pre_hooks\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", example + check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answer_line = next(ln for ln in out.stdout.splitlines() if " -> " in ln)
    answer, expected = re.fullmatch(r".+ -> (.*) \(expected (.+)\)", answer_line).groups()
    assert answer.strip() == expected  # the pruned model still answers this scene right
    assert "[144] -> [36]" in out.stdout  # the comment's "keep 36 of the 144 visual tokens"


@needs(is_available("qwen2_5_vl-tiny-sortofclevr-video"), "the embedded video model's weights are missing")
def test_readme_video_example_runs(tmp_path):
    example = next(b for b in re.findall(r"```python\n(.+?)\n```", README, flags=re.S) if '-video")' in b)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answer, expected = re.search(r" -> (.*) \(expected (.+)\)", out.stdout).groups()
    assert answer.strip() == expected  # a quarter of every frame still answers this clip right
    assert "video 4 temporal groups: 600 -> 150" in out.stdout  # the 8 frames are 4 groups of 150 tokens
