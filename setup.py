from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = {}
exec((here / "vtprune" / "_version.py").read_text(), version)

# One requirement string per package, shared by every extra: `pip install -e ".[test]"` after `".[eval]"` (the
# README's order) then finds every installed version acceptable and changes none.
PILLOW = "pillow>=10,<13"  # gradio (demo, test) requires pillow < 13; a newer one from [eval] would be downgraded
EVAL = [
    "matplotlib>=3.7",
    "tqdm>=4.60",
    "torchvision>=0.19",
]  # torchvision: the Qwen2-VL processors build a video processor that needs it
LMMS = ["lmms-eval>=0.7.3,<0.8"]
DEMO = ["gradio>=5,<7", "av>=12"]  # av: the demo reads uploaded videos
# Caps that [test]'s tree imposes on packages [eval] installs too (found with `pip install --dry-run --report`
# of [test] over a fresh [eval]): lmms-eval 0.7.3 imports filelock._api, gone in filelock 4 (torch installs
# filelock); lmms-eval's table writer needs typepy[datetime], which caps python-dateutil < 3 (matplotlib's).
SHARED = [PILLOW, "filelock>=3.24.2,<4", "python-dateutil>=2.8,<3"]

setup(
    name="vtprune",
    version=version["__version__"],
    description="Training-free visual token pruning and merging for Hugging Face vision-language models",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # One import namespace over four top-level folders; eval/ holds one subpackage per role.
    package_dir={"vtprune": "vtprune", "vtprune.patches": "patches", "vtprune.cuda": "cuda", "vtprune.eval": "eval"},
    packages=[
        "vtprune",
        "vtprune.strategies",
        "vtprune.patches",
        "vtprune.cuda",
        "vtprune.eval",
        *(f"vtprune.eval.{role}" for role in ("data", "harness", "lmms", "models", "robustness")),
    ],
    include_package_data=True,
    # The embedded models' folders and the offline lmms-eval tasks; measured results live in docs/, not here.
    package_data={
        "vtprune.eval.models": ["*/*"],
        "vtprune.eval.lmms": ["tasks/*/*.yaml", "tasks/*/*.py", "tasks/*/*.jsonl"],
    },
    install_requires=["torch>=2.4", "transformers>=5.20,<6", "accelerate>=1.0", PILLOW],
    extras_require={
        "eval": EVAL + SHARED,
        "lmms": LMMS + SHARED,
        "demo": DEMO + SHARED,
        # torchcodec: transformers decodes video files with it (FFmpeg's libraries come from the system)
        "test": ["pytest>=8", "playwright>=1.40", "ruff>=0.6", "torchcodec>=0.8"] + EVAL + LMMS + DEMO + SHARED,
        "flash": ["flash-attn>=2.6"],
        "triton": ["triton>=3.0"],
    },
    entry_points={
        "console_scripts": ["vtprune = vtprune.cli:main"],
        # lmms-eval 0.7.3 reads ModelManifests from this group (one entry registers both wrappers).
        "lmms_eval.models": ["vtprune = vtprune.eval.lmms.plugin:lmms_eval_manifests"],
    },
)
