"""A plain (non-editable) install must give the same import namespace as the source tree."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_into_fresh_venv(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("vtprune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("vtprune/__init__.py", "vtprune/patches/__init__.py", "vtprune/eval/__init__.py",
                     "vtprune/cuda/__init__.py", "vtprune/strategies/__init__.py"):
        assert expected in names, expected
    assert not any(n.startswith(("patches/", "eval/", "cuda/", "tests/")) for n in names)
    venv = tmp_path / "venv"
    # System site-packages supply torch/transformers; the venv holds only vtprune, away from the source tree.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    code = ("import vtprune, vtprune.patches, vtprune.eval, vtprune.cuda; "
            "assert 'site-packages' in vtprune.__file__ and 'site-packages' in vtprune.patches.__file__, "
            "vtprune.__file__; print(vtprune.list_methods())")
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "divprune" in out.stdout
