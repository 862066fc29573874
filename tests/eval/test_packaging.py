"""A plain (non-editable) install must give the same import namespace as the source tree, and a clone must still run
its tests after one (the README's installs in any order)."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _can_build_wheels() -> bool:
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    except ImportError:
        return importlib.util.find_spec("wheel") is not None
    return True


def test_wheel_installs_into_fresh_venv(tmp_path):
    # Build here when this environment can (offline); a fresh venv's setuptools 65 cannot without `wheel`, and
    # then pip builds in isolation as `pip install .` does.
    isolation = [] if _can_build_wheels() else ["--use-pep517"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            *(isolation or ["--no-build-isolation"]),
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("vtprune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "vtprune/__init__.py",
        "vtprune/patches/__init__.py",
        "vtprune/eval/__init__.py",
        "vtprune/cuda/__init__.py",
        "vtprune/strategies/__init__.py",
    ):
        assert expected in names, expected
    assert not any(n.startswith(("patches/", "eval/", "cuda/", "tests/")) for n in names)
    venv = tmp_path / "venv"
    # A bare venv holds only vtprune; torch and transformers come from this interpreter's site-packages, listed
    # in a .pth after the venv's own (whether this interpreter is a venv or the system one). Their .pth files are
    # not run, so an editable vtprune install there cannot shadow the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_dir = next((venv / "lib").glob("python3*/site-packages"))
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site_dir / "outer.pth").write_text("\n".join(outer) + "\n")
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)], check=True
    )
    code = (
        "import vtprune, vtprune.patches, vtprune.eval, vtprune.cuda; "
        "assert 'site-packages' in vtprune.__file__ and 'site-packages' in vtprune.patches.__file__, "
        "vtprune.__file__; print(vtprune.list_methods())"
    )
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "divprune" in out.stdout
    # The README's order (pip install -e ".[test]", then pip install ".[demo]", which replaces the editable install):
    # from the clone's root Python imports the clone's vtprune/ folder first, which must still find patches/, cuda/
    # and eval/ beside it; the tests then run as after the editable install.
    clone = "import vtprune.patches, vtprune.eval.models, vtprune.cuda; print(vtprune.patches.__file__)"
    out = subprocess.run([str(py), "-c", clone], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and str(ROOT / "patches") in out.stdout, out.stderr
    tests = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/core/test_units.py", "-k", "remainder"]
    out = subprocess.run(tests, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def _setup_kwargs() -> dict:
    import runpy
    from unittest import mock

    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return setup.call_args.kwargs


def test_extras_agree_on_every_shared_package():
    """One requirement string per package across install_requires and every extra, and [test] holds all of
    [eval]: so `pip install -e ".[test]"` after `".[eval]"` (the README's order) has no reason to change a version."""
    import re

    kw = _setup_kwargs()
    groups = {"install": kw["install_requires"], **kw["extras_require"]}
    seen: dict[str, tuple[str, str]] = {}
    for group, reqs in groups.items():
        for req in reqs:
            name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
            if name in seen:
                assert seen[name][1] == req, f"{name}: {seen[name][0]} says {seen[name][1]!r}, {group} says {req!r}"
            seen[name] = (group, req)
    assert set(groups["eval"]) <= set(groups["test"])
    assert any(r.startswith("pillow") and "<13" in r for r in groups["install"])  # gradio's cap, for everyone
