"""lmms-eval integration: entry points, the embedded task, the wrappers through the real CLI and run_lmms.

lmms-eval is optional for vtprune but installed by the `test` extra; in CI (CI or VTPRUNE_REQUIRE_LMMS set) a
missing or unusable lmms-eval is a failure, elsewhere the tests that need it are skipped.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import needs
from vtprune.eval.catalog import is_available

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = ROOT / "eval" / "lmms" / "tasks" / "vtprune_sortofclevr"
OFFLINE = {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _lmms_problem():
    try:
        import lmms_eval  # noqa: F401
    except ImportError as exc:
        return f"lmms-eval is not installed ({exc}); pip install -e '.[test]'"
    try:
        import filelock._api  # noqa: F401  (lmms-eval 0.7.3's evaluator imports it; filelock 4 removed it)
    except ImportError:
        return "lmms-eval 0.7.3 needs filelock<4; pip install -e '.[test]'"
    return None


PROBLEM = _lmms_problem()
requires_lmms = needs(PROBLEM is None, str(PROBLEM))


def _task_utils(path=TASK_DIR / "utils.py", name="vtprune_sortofclevr_utils"):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_task_jsonl_is_the_embedded_test_split():
    from vtprune.eval.data import HEIGHT, WIDTH, make_split

    utils = _task_utils()
    docs = [json.loads(line) for line in (TASK_DIR / "test.jsonl").read_text().splitlines()]
    assert docs == utils.rows(len(docs)) and len(docs) == utils.N_EXAMPLES
    with pytest.raises(ValueError, match=f"{docs[1]['uid']}: .*`python utils.py`"):
        utils.doc_to_visual(dict(docs[1], question="a question the generator never asked"))
    examples = make_split("test", 10, seed=0)
    for doc, ex in zip(docs, examples):
        assert (doc["question"], doc["answer"], doc["qtype"]) == (ex.question, ex.answer, ex.qtype)
        (img,) = utils.doc_to_visual(doc)
        assert img.size == (WIDTH, HEIGHT) and img.tobytes() == ex.image.tobytes()
    assert utils.doc_to_text(docs[0]) == docs[0]["question"]
    assert utils.process_results(docs[0], [f" {docs[0]['answer'].upper()} "]) == {
        "exact_match": 1.0,
        f"acc_{docs[0]['qtype']}": 1.0,
    }
    assert utils.process_results_first_word(docs[1], [f"{docs[1]['answer'].capitalize()}."])["exact_match"] == 1.0
    with pytest.raises(ValueError, match="regenerate"):
        utils.doc_to_visual({**docs[0], "answer": "nonsense"})


def test_importing_vtprune_does_not_import_lmms_eval():
    code = (
        "import sys, vtprune, vtprune.eval, vtprune.eval.lmms.runner; "
        "bad = [m for m in sys.modules if m.startswith('lmms_eval')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, **OFFLINE})


# --------------------------------------------------------------------------------------------- saved models
_TEMPLATE = (
    "{% for message in messages %}{% for c in message['content'] %}{% if c['type'] == 'image' %}IMG "
    "{% endif %}{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}USER: "
    "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def _saved(family, tmp_path_factory):
    """The embedded model of the family when it has been trained, else a tiny random one with a chat template."""
    from vtprune.eval.catalog import is_available, model_dir

    name = {"llava": "llava-tiny-sortofclevr", "qwen2_5_vl": "qwen2_5_vl-tiny-sortofclevr"}[family]
    if is_available(name):
        return model_dir(name)
    from vtprune.testing import tiny_model, tiny_processor

    out = tmp_path_factory.mktemp(f"tiny_{family}")
    processor = tiny_processor(family)
    img = "<image>" if family == "llava" else "<|vision_start|> <|image_pad|> <|vision_end|>"
    processor.chat_template = _TEMPLATE.replace("IMG", img)
    tiny_model(family).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return _saved("llava", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return _saved("qwen2_5_vl", tmp_path_factory)


# --------------------------------------------------------------------------------------------- registration
@requires_lmms
def test_entry_point_registers_both_wrappers():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.value.startswith("vtprune.")]
    assert eps, "vtprune's lmms_eval.models entry point is not installed: pip install -e . (after setup.py declares it)"
    from lmms_eval.models import get_model

    from vtprune.eval.lmms.plugin import VtpruneLlava, VtpruneQwen25VL

    assert get_model("vtprune_llava") is VtpruneLlava
    assert get_model("vtprune_qwen2_5_vl") is VtpruneQwen25VL
    from vtprune.eval.lmms.plugin import VtpruneLMM

    assert get_model("vtprune") is VtpruneLMM


@requires_lmms
def test_model_types_come_from_the_adapter_registry(monkeypatch, qwen_dir):
    """A family added to vtprune.patches.FAMILIES is taken by the wrappers without a plugin edit."""
    from vtprune.eval.lmms import plugin as lmms_plugin
    from vtprune.patches import FAMILIES

    assert lmms_plugin.VtpruneLMM.model_types() == sorted(FAMILIES)
    monkeypatch.setitem(lmms_plugin.FAMILIES, "llava_onevision", object)
    assert "llava_onevision" in lmms_plugin.VtpruneLlava.model_types()
    assert "llava_onevision" not in lmms_plugin.VtpruneQwen25VL.model_types()
    monkeypatch.delitem(lmms_plugin.FAMILIES, "qwen2_5_vl")
    with pytest.raises(ValueError, match="'qwen2_5_vl' checkpoint but --model vtprune takes"):
        lmms_plugin.VtpruneLMM(pretrained=str(qwen_dir), device="cpu")


# --------------------------------------------------------------------------------------------- wrapper units
@requires_lmms
def test_model_args_are_parsed_and_checked(llava_dir):
    from vtprune.eval.lmms.args import coerce, pruning_settings
    from vtprune.eval.lmms.plugin import VtpruneLlava, VtpruneQwen25VL

    assert [coerce(x) for x in ("0.25", "true", "False", "12", "none", "divprune")] == [
        0.25,
        True,
        False,
        12,
        None,
        "divprune",
    ]
    s = pruning_settings(method="fastv", keep_ratio="0.5", layer="2", keep_newlines="true")
    assert (s["keep_ratio"], s["layer"], s["keep_newlines"]) == (0.5, 2, True)
    assert pruning_settings(method="none") is None
    with pytest.raises(ValueError, match="unpruned"):
        pruning_settings(method="none", keep_ratio=0.5)
    with pytest.raises(ValueError, match="integer"):
        pruning_settings(keep_tokens="1.5")

    lm = VtpruneLlava.create_from_arg_string(
        f"pretrained={llava_dir},method=divprune,keep_tokens=3,batch_size=2",
        {"batch_size": 1, "device": "cpu", "max_batch_size": None},
    )
    assert lm.batch_size == 2 and lm.pruning["keep_tokens"] == 3 and lm.device == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown option"):
        lm.reconfigure(method="divprune", keep_ratio=0.5, no_such_option=1)
    with pytest.raises(ValueError, match="vtprune_llava"):
        VtpruneQwen25VL(pretrained=str(llava_dir))
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])


class _Req:
    def __init__(self, *args):
        self.args = args


@requires_lmms
def test_generate_until_matches_the_embedded_harness(llava_dir, monkeypatch):
    """Same prompts and answers as eval/embedded.predict (batched, sorted, then restored to request order)."""
    import vtprune
    from vtprune.eval.data import make_split
    from vtprune.eval.harness import predict
    from vtprune.eval.lmms.plugin import VtpruneLlava

    utils = _task_utils()
    docs = [json.loads(line) for line in (TASK_DIR / "test.jsonl").read_text().splitlines()[:6]]
    examples = make_split("test", 6, seed=0)
    lm = VtpruneLlava(
        pretrained=str(llava_dir), method="divprune", keep_ratio="0.5", batch_size=4, device="cpu", dtype="float32"
    )
    lm.task_dict = {"t": {"test": docs}}
    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    reqs = [_Req(d["question"], dict(gen), utils.doc_to_visual, i, "t", "test") for i, d in enumerate(docs)]
    got = lm.generate_until(reqs)
    want = predict(lm.model, lm.processor, examples, batch_size=1)
    assert got == want
    s = lm.summary()
    assert s["n"] == 6 and s["kept_tokens"] == pytest.approx(
        sum(max(1, int(0.5 * r["visual_tokens"] + 0.5)) for r in lm.records) / 6
    )
    assert s["kept_tokens"] < s["visual_tokens"] and s["prefill_flops"] > 0
    assert vtprune.get_config(lm.model).keep_ratio == 0.5

    # Results come back in request order whatever the batching order.
    monkeypatch.setattr(lm, "_run_batch", lambda items: [it[0] for it in items])
    reqs = [_Req("x" * n, dict(gen), utils.doc_to_visual, i, "t", "test") for i, n in enumerate([3, 9, 1, 7, 5])]
    assert lm.generate_until(reqs) == ["x" * n for n in [3, 9, 1, 7, 5]]


# --------------------------------------------------------------------------------------------- end to end
@requires_lmms
def test_lmms_eval_cli_runs_the_embedded_task(llava_dir, tmp_path):
    exe = Path(sys.executable).with_name("lmms-eval")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmms_eval"]
    out = tmp_path / "out"
    cmd += [
        "--model",
        "vtprune_llava",
        "--model_args",
        f"pretrained={llava_dir},method=divprune,keep_ratio=0.25,device=cpu,dtype=float32",
        "--tasks",
        "vtprune_sortofclevr",
        "--include_path",
        str(ROOT / "eval" / "lmms" / "tasks"),
        "--limit",
        "4",
        "--batch_size",
        "2",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    files = list(out.glob("*/*_results.json"))  # lmms-eval exits 0 even when the evaluation failed
    assert proc.returncode == 0 and len(files) == 1, log
    res = json.loads(files[0].read_text())
    task = res["results"]["vtprune_sortofclevr"]
    assert 0.0 <= task["exact_match,none"] <= 1.0
    assert res["n-samples"]["vtprune_sortofclevr"]["effective"] == 4
    thr = res["throughput"]
    n_vis = thr["avg_visual_tokens"]
    assert n_vis > 0 and thr["avg_kept_visual_tokens"] == max(1, int(0.25 * n_vis + 0.5)) < n_vis
    assert thr["avg_prefill_flops"] > 0


@requires_lmms
def test_run_lmms_in_process(qwen_dir, tmp_path, monkeypatch):
    from vtprune.eval.lmms.runner import run_lmms

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    rows = run_lmms(
        str(qwen_dir),
        ["vtprune_sortofclevr"],
        ["divprune"],
        [50],
        limit=5,
        output_dir=tmp_path / "res",
        batch_size=3,
        device="cpu",
        dtype="float32",
    )
    assert [(r["method"], r["keep_ratio"]) for r in rows] == [("none", 1.0), ("divprune", 0.5)]
    for r in rows:
        assert r["model"] == Path(qwen_dir).name and r["task"] == "vtprune_sortofclevr"
        assert r["metric"] == "exact_match" and 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 5
        assert r["latency_s"] > 0 and r["prefill_latency_ms"] > 0 and r["prefill_flops"] > 0
        assert "acc_shape" in r and "acc_nearest" in r
    base, pruned = rows
    assert base["kept_tokens"] == base["visual_tokens"] > pruned["kept_tokens"] > 0
    assert pruned["prefill_flops"] < base["prefill_flops"]
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        f"lmms_{Path(qwen_dir).name}_divprune_50.json",
        f"lmms_{Path(qwen_dir).name}_none_100.json",
    ]


# --------------------------------------------------------------------------------------------- as users run it
def _path_with_console_scripts(tmp_path) -> str:
    """PATH on which `lmms-eval` and `vtprune` are this interpreter's (a venv may see another install's scripts)."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, module in (("lmms-eval", "lmms_eval"), ("vtprune", "vtprune.cli")):
        (shims / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        (shims / name).chmod(0o755)
    return f"{shims}{os.pathsep}{os.environ['PATH']}"


def _readme_lmms_command() -> str:
    section = (ROOT / "README.md").read_text().split("\n### lmms-eval\n", 1)[1].split("\n#", 1)[0]
    return next(c for c in re.findall(r"```bash\n(.+?)\n```", section, flags=re.S) if c.startswith("lmms-eval "))


def _samples(folder: Path) -> dict:
    (path,) = folder.glob("*/*_samples_vtprune_sortofclevr.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["doc_id"]: (r["filtered_resps"], r["exact_match"]) for r in rows}


@requires_lmms
def test_readme_lmms_eval_command_runs_offline_on_an_embedded_name(tmp_path):
    """The README's raw lmms-eval command, verbatim: task folder from `vtprune tasks-path`, model by its name."""
    command = _readme_lmms_command()
    assert "pretrained=llava-tiny-sortofclevr" in command and "$(vtprune tasks-path)" in command
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "PATH": _path_with_console_scripts(tmp_path)}
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list((tmp_path / "lmms-results").glob("*/*_results.json"))
    assert proc.returncode == 0 and len(files) == 1, log  # lmms-eval exits 0 even when nothing ran
    res = json.loads(files[0].read_text())
    limit = int(re.search(r"--limit (\d+)", command).group(1))
    assert res["n-samples"]["vtprune_sortofclevr"]["effective"] == limit
    assert res["results"]["vtprune_sortofclevr"]["exact_match,none"] > 0.5  # the trained model, not a random one
    assert res["throughput"]["avg_kept_visual_tokens"] == 36 < res["throughput"]["avg_visual_tokens"] == 144


@requires_lmms
def test_two_cpu_processes_give_the_answers_of_one(tmp_path):
    """accelerate launch with two CPU processes: each answers its shard; together the answers and metric of one."""
    args = [
        "-m",
        "lmms_eval",
        "--model",
        "vtprune",
        "--model_args",
        "pretrained=qwen2_5_vl-tiny-sortofclevr,method=divprune,keep_ratio=0.25",
        "--tasks",
        "vtprune_sortofclevr",
        "--include_path",
        str(ROOT / "eval" / "lmms" / "tasks"),
        "--limit",
        "6",
        "--batch_size",
        "2",
        "--log_samples",
    ]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    runs = {
        "one": [sys.executable, *args],
        "two": [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            "0",
            *args,
        ],
    }
    results = {}
    for name, cmd in runs.items():
        proc = subprocess.run(
            [*cmd, "--output_path", str(tmp_path / name)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        log = proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.returncode == 0 and list((tmp_path / name).glob("*/*_results.json")), log
        if name == "two":
            full = proc.stdout + proc.stderr
            assert "(rank 1/2)" in full and "(rank 0/2)" in full, log  # really two processes, one shard each
        (path,) = (tmp_path / name).glob("*/*_results.json")
        results[name] = json.loads(path.read_text())["results"]["vtprune_sortofclevr"]
    assert _samples(tmp_path / "two") == _samples(tmp_path / "one") and len(_samples(tmp_path / "one")) == 6
    assert results["two"] == results["one"]


# --------------------------------------------------------------------------------------------- the video task
VIDEO_TASK_DIR = ROOT / "eval" / "lmms" / "tasks" / "vtprune_sortofclevr_video"


def _video_utils():
    return _task_utils(VIDEO_TASK_DIR / "video_utils.py", "vtprune_video_task_utils")


def test_video_task_jsonl_is_what_the_generator_makes():
    utils = _video_utils()
    stored = [json.loads(line) for line in (VIDEO_TASK_DIR / "test.jsonl").read_text().splitlines()]
    assert stored == utils.rows(len(stored)) and len(stored) == utils.N_EXAMPLES
    doc = dict(stored[0], answer="not the answer")
    with pytest.raises(ValueError, match="regenerate test.jsonl with `python video_utils.py`"):
        utils.doc_to_visual(doc)
    assert utils.process_results(stored[0], [stored[0]["answer"]]) == {
        "exact_match": 1.0,
        "acc_multi_frame": 1.0,
        f"acc_{stored[0]['qtype']}": 1.0,
    }


@requires_lmms
def test_media_sorts_images_videos_and_refuses_the_rest():
    import numpy as np
    from PIL import Image

    from vtprune.eval.lmms.plugin import VtpruneLMM

    img = Image.new("RGB", (4, 4))
    arr = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images, videos = VtpruneLMM._media([img, [img, img], arr, "clip.mp4"], "t")
    assert len(images) == 1 and [type(v).__name__ for v in videos] == ["list", "ndarray", "str"]
    with pytest.raises(NotImplementedError, match="got dict"):
        VtpruneLMM._media([{"array": [0.0]}], "t")


@requires_lmms
@needs(is_available("qwen2_5_vl-tiny-sortofclevr-video"), "the embedded video model's weights are missing")
def test_video_task_matches_the_harness_and_runs_in_the_real_cli(tmp_path):
    """The wrapper answers the video task's documents exactly as vtprune.eval.harness.predict_video does (pruned,
    batched); the real lmms-eval CLI runs the task offline on the embedded video model."""
    from vtprune.eval.data import make_video_split
    from vtprune.eval.harness import predict_video
    from vtprune.eval.lmms.plugin import VtpruneLMM

    torch.set_num_threads(1)
    utils = _video_utils()
    docs = [json.loads(line) for line in (VIDEO_TASK_DIR / "test.jsonl").read_text().splitlines()[:4]]
    lm = VtpruneLMM(
        pretrained="qwen2_5_vl-tiny-sortofclevr-video",
        method="divprune",
        keep_ratio="0.25",
        temporal="frame",
        batch_size=2,
        device="cpu",
        dtype="float32",
    )
    lm.task_dict = {"v": {"test": docs}}
    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False}
    got = lm.generate_until(
        [_Req(d["question"], dict(gen), utils.doc_to_visual, i, "v", "test") for i, d in enumerate(docs)]
    )
    assert got == predict_video(lm.model, lm.processor, make_video_split("test", 4, seed=0), batch_size=1)
    assert {r["kept_tokens"] for r in lm.records} == {150} and {r["visual_tokens"] for r in lm.records} == {600}

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "vtprune",
        "--model_args",
        "pretrained=qwen2_5_vl-tiny-sortofclevr-video,method=divprune,keep_ratio=0.25,temporal=frame,device=cpu",
        "--tasks",
        "vtprune_sortofclevr_video",
        "--include_path",
        str(ROOT / "eval" / "lmms" / "tasks"),
        "--limit",
        "6",
        "--batch_size",
        "3",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    files = list(out.glob("*/*_results.json"))
    assert proc.returncode == 0 and len(files) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(files[0].read_text())
    task = res["results"]["vtprune_sortofclevr_video"]
    assert res["n-samples"]["vtprune_sortofclevr_video"]["effective"] == 6
    assert task["acc_single_frame,none"] == 1.0  # the two single-frame controls of the six: the model answers them
    assert res["throughput"]["avg_kept_visual_tokens"] == 150 and res["throughput"]["avg_visual_tokens"] == 600


@requires_lmms
def test_the_eval_wrapper_exits_non_zero_on_an_unknown_task(tmp_path, capsys):
    """lmms-eval's own CLI logs an unknown task and exits 0; `vtprune eval --model` says so and exits 2."""
    from vtprune.cli import main

    argv = [
        "eval",
        "--model",
        "llava-tiny-sortofclevr",
        "--tasks",
        "vtprune_sortofclever",
        "--limit",
        "2",
        "--methods",
        "random",
        "--budgets",
        "50",
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lmms-eval task(s) ['vtprune_sortofclever'] not found" in err and not (tmp_path / "out").exists()
