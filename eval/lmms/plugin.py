"""lmms-eval model wrapper that runs Hugging Face VLMs with vtprune's visual token pruning.

Registered with lmms-eval (0.7.x) through the Python entry-point group ``lmms_eval.models`` as ``vtprune`` (any
family in ``vtprune.patches.FAMILIES``), with the older names
``vtprune_llava`` (the LLaVA families) and ``vtprune_qwen2_5_vl`` (the Qwen families) kept as aliases, so that,
once vtprune is installed::

    lmms-eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=divprune,keep_ratio=0.25 \\
        --tasks vtprune_sortofclevr_word --include_path "$(vtprune tasks-path)"

``pretrained`` may also name an embedded model (``llava-tiny-sortofclevr``, ``qwen2_5_vl-tiny-sortofclevr``, the
video model ``qwen2_5_vl-tiny-sortofclevr-video``), loaded offline from the package as
``vtprune.eval.models.load_embedded`` does.

Visuals: a PIL image is an image; a list of PIL frames, a [frames, H, W, 3] array or a video file path (decoded by
the model's processor, which needs a video backend such as PyAV for files) is a video.  The video task of the
embedded benchmark is ``vtprune_sortofclevr_video``.

model_args (``key=value,...``; "0.25", "true", "12", "none" are converted to float / bool / int / None):

* ``pretrained`` (required): HF id or local directory.
* ``method`` (default ``divprune``; ``none`` runs the unpruned model), ``keep_ratio``, ``keep_tokens``, ``layer``,
  ``positions``, ``schedule`` (a JSON list of stage dicts): passed to ``vtprune.apply_pruner``.
* ``device`` (default ``cuda`` if available, else ``cpu``; under ``accelerate launch`` the process's own
  device), ``device_map`` (e.g. ``auto``; single process only),
  ``dtype`` (``auto``, ``float32``, ``bfloat16``, ``float16``), ``attn_implementation``, ``revision``,
  ``trust_remote_code``.
* ``batch_size`` (left-padded batched generation), ``max_new_tokens`` (overrides the task's value).
* ``time_prefill`` (default false): time the uncached prefill of the first batch (median of 3, after a warm-up).
  ``count_flops`` (default true): analytic prefill FLOPs per sample (``vtprune.flops.count_prefill``).
* Any other key is a method option (e.g. ``keep_newlines=true``) and goes to ``apply_pruner``, which rejects
  unknown ones with a clear error.

Visual tokens kept per sample (``get_stats`` of the last stage; the image-token count when unpruned) are logged
through lmms-eval's generation metrics, so the results JSON carries them under ``throughput``
(``avg_kept_visual_tokens``, ``avg_visual_tokens``, ``avg_prefill_flops``); ``records`` / ``summary()`` give them
per sample in-process (``vtprune.eval.lmms.runner.run_lmms``).

Several processes: under ``accelerate launch --multi_gpu --num_processes N`` every process loads a full copy of the
model on its own device (``cuda:<local rank>``, or the CPU when there is no GPU or ``device=cpu``) and lmms-eval
shards the documents by ``rank`` / ``world_size`` (data parallel, as lmms-eval's own HF wrappers do); the answers and
metrics are those of one process (tests/eval/test_lmms.py checks it with two CPU processes). FSDP / DeepSpeed
sharding is refused. The pruning statistics in the results JSON are those of rank 0.

Only this module (and the task's utils.py) imports lmms_eval; ``import vtprune`` never does.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

_MODULE = "vtprune.eval.lmms.plugin"


def lmms_eval_manifests():
    """The ``lmms_eval.models`` entry-point payload: one ModelManifest per registered name.

    Defined before any lmms_eval import so that lmms-eval can load it even while this module is being imported
    (lmms-eval loads entry points while ``lmms_eval.models`` initialises)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=f"{_MODULE}.{cls}") for name, cls in _NAMES.items()]


_NAMES = {"vtprune": "VtpruneLMM", "vtprune_llava": "VtpruneLlava", "vtprune_qwen2_5_vl": "VtpruneQwen25VL"}


import torch  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.api.registry import register_model  # noqa: E402
from loguru import logger  # noqa: E402

import vtprune  # noqa: E402
from vtprune.patches import FAMILIES  # noqa: E402

from .. import catalog  # noqa: E402
from ..models import build_prompt, count_visual_tokens  # noqa: E402
from .args import _as_bool, _as_dtype, _as_int, coerce, pruning_settings  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = 256


# ----------------------------------------------------------------------------------------------- the wrappers
@register_model("vtprune")
class VtpruneLMM(lmms):
    """Any family vtprune has an adapter for (simple, i.e. doc_to_visual / doc_to_text, interface)."""

    name = "vtprune"
    is_simple = True
    prefix = ""  # the aliases accept only the adapter model types starting with their prefix

    @classmethod
    def model_types(cls) -> list[str]:
        return sorted(t for t in FAMILIES if t.startswith(cls.prefix))

    def __init__(
        self,
        pretrained: str | None = None,
        method: Any = "divprune",
        keep_ratio: Any = None,
        keep_tokens: Any = None,
        layer: Any = None,
        positions: Any = "original",
        schedule: Any = None,
        device: Any = None,
        device_map: Any = None,
        batch_size: Any = 1,
        max_batch_size: Any = None,
        dtype: Any = "auto",
        max_new_tokens: Any = None,
        attn_implementation: Any = None,
        revision: Any = None,
        trust_remote_code: Any = False,
        time_prefill: Any = False,
        count_flops: Any = True,
        **options,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        if not pretrained:
            raise ValueError(f"{type(self).__name__} needs model_args pretrained=<HF id or local directory>")
        self.pretrained = str(pretrained)
        self.batch_size_per_gpu = _as_int("batch_size", batch_size, minimum=1) or 1
        self.max_new_tokens = _as_int("max_new_tokens", max_new_tokens, minimum=1)
        self.time_prefill = _as_bool("time_prefill", time_prefill)
        self.count_flops = _as_bool("count_flops", count_flops)
        del max_batch_size  # lmms-eval passes it for automatic batch sizing, which these wrappers do not do
        # Validate the pruning settings before loading any weights (apply_pruner re-checks them on the model).
        settings = pruning_settings(method, keep_ratio, keep_tokens, layer, positions, schedule, **options)
        if settings is not None:
            self._check(settings)

        revision = coerce(revision)
        trust_remote_code = _as_bool("trust_remote_code", trust_remote_code)
        hub = (
            dict(revision=revision, trust_remote_code=trust_remote_code)
            if revision
            else dict(trust_remote_code=trust_remote_code)
        )
        embedded = self.pretrained if self.pretrained in catalog.EMBEDDED_MODELS + catalog.VIDEO_MODELS else None
        config = AutoConfig.from_pretrained(catalog.resolve(self.pretrained), **hub)
        if config.model_type not in self.model_types():
            fits = [n for n, c in _aliases().items() if config.model_type in c.model_types()]
            raise ValueError(
                f"{self.pretrained} is a {config.model_type!r} checkpoint but --model "
                f"{self.registered_name} takes {self.model_types()}"
                + (f"; use --model {' or '.join(fits)}" if fits else "")
            )

        # Device placement as lmms-eval's HF wrappers do it: one full model per process under accelerate launch.
        self.accelerator = Accelerator()
        device_map = coerce(device_map)
        # `accelerate launch --multi_gpu` on a machine without GPUs starts torchrun processes that accelerate itself
        # reports as one; lmms-eval shards by WORLD_SIZE / RANK from the environment, and so do we.
        world = max(self.accelerator.num_processes, int(os.environ.get("WORLD_SIZE", "1")))
        if world > 1:
            from accelerate import DistributedType

            allowed = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO)
            if self.accelerator.distributed_type not in allowed:
                raise NotImplementedError(
                    f"{self.registered_name} supports data-parallel accelerate launch only (one model copy per "
                    f"process), not {self.accelerator.distributed_type}: vtprune patches one model instance"
                )
            if device_map:
                raise ValueError("device_map cannot be combined with multi-process (accelerate launch) evaluation")
            # accelerate's device is cuda:<local rank> on GPUs and the CPU otherwise; device=cpu forces the CPU.
            device = coerce(device)
            self._device = torch.device("cpu") if device == "cpu" else self.accelerator.device
            self._rank = (
                self.accelerator.process_index
                if self.accelerator.num_processes > 1
                else int(os.environ.get("RANK", "0"))
            )
            self._world_size = world
        else:
            device = coerce(device)
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self._rank, self._world_size = 0, 1

        load = dict(hub, dtype=_as_dtype(dtype))
        if attn_implementation is not None:
            load["attn_implementation"] = coerce(attn_implementation)
        if device_map and world == 1:
            load["device_map"] = device_map
        if embedded:  # offline, with the image backend the embedded models were trained with
            from ..models import load_embedded

            model, self.processor = load_embedded(
                embedded, **({} if load["dtype"] == "auto" else {"dtype": load["dtype"]})
            )
        else:
            model = AutoModelForImageTextToText.from_pretrained(self.pretrained, **load)
            self.processor = AutoProcessor.from_pretrained(self.pretrained, **hub)
        if "device_map" not in load:
            model.to(self._device)
        self._model = model.eval()
        self._config = model.config
        self._tokenizer = self.processor.tokenizer
        self._tokenizer.padding_side = "left"  # batched generation continues every row from its last column

        self.pruning: dict | None = None
        self.records: list[dict] = []
        self.prefill_latency_s: float | None = None
        self.prefill_latency_batch: int | None = None
        self._flops_failed = False
        self.keep_loaded = False
        self.reconfigure(settings)
        logger.info(
            f"{self.registered_name}: {self.pretrained} on {self._device} "
            f"(rank {self._rank}/{self._world_size}), pruning {self.pruning or 'off'}"
        )

    # -- lmms-eval plumbing ---------------------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that model_args win over the command line's --batch_size / --device (lmms-eval
        would otherwise fail with a duplicate keyword when both are given)."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string or "")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def registered_name(self) -> str:
        return getattr(type(self), "name", type(self).__name__)

    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._config

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # -- pruning -------------------------------------------------------------------------------------------------
    def reconfigure(self, settings: dict | None = None, **model_args) -> None:
        """Switch the pruning configuration of the loaded model (None / method=none: unpruned) and clear the
        per-sample records. ``model_args`` are parsed like the command line's (``method="fastv", layer="2"``)."""
        if model_args:
            if settings is not None:
                raise ValueError("pass either settings or model_args, not both")
            settings = pruning_settings(**model_args)
        if self.pruning is not None:
            vtprune.remove_pruner(self._model)
            self.pruning = None
        if settings is not None:
            clean = {k: v for k, v in settings.items() if v is not None}
            try:
                vtprune.apply_pruner(self._model, **clean)
            except ValueError as exc:
                raise ValueError(
                    f"{self.registered_name}: invalid pruning model_args {clean}: {exc}. Wrapper "
                    f"model_args are {sorted(_WRAPPER_ARGS)}; any other key is a method option."
                ) from exc
            self.pruning = clean
        self.records = []
        self.prefill_latency_s = None
        self.prefill_latency_batch = None

    def _check(self, settings: dict) -> None:
        clean = {k: v for k, v in settings.items() if v is not None}
        fields = {
            k: clean.pop(k)
            for k in ("method", "keep_ratio", "keep_tokens", "layer", "schedule", "positions")
            if k in clean
        }
        try:
            vtprune.PrunerConfig(**fields, options=clean).stages()
        except ValueError as exc:
            given = {k: v for k, v in settings.items() if v is not None}
            raise ValueError(
                f"{self.registered_name}: invalid pruning model_args {given}: {exc}. Wrapper "
                f"model_args are {sorted(_WRAPPER_ARGS)}; any other key is a method option."
            ) from exc

    def summary(self, tasks=None) -> dict:
        """Means per sample over ``records`` (optionally only of the given task names): visual_tokens,
        kept_tokens, prefill_flops (None if not counted), latency_s (generate() wall time per sample), n."""
        recs = [r for r in self.records if tasks is None or r["task"] in set(tasks)]
        out: dict = {"n": len(recs)}
        for key in ("visual_tokens", "kept_tokens", "prefill_flops", "latency_s"):
            vals = [r[key] for r in recs if r[key] is not None]
            out[key] = statistics.fmean(vals) if vals and len(vals) == len(recs) else None
        out["prefill_latency_s"] = self.prefill_latency_s
        out["prefill_latency_batch"] = self.prefill_latency_batch
        return out

    # -- prompts and inputs --------------------------------------------------------------------------------------
    def build_prompt(self, context: str, n_images: int, n_videos: int = 0) -> str:
        """The processor's chat template with the images first, then the videos, then the text
        (vtprune.eval.models.build_prompt); without a template, ``USER: <image> ... ASSISTANT:`` with the processor's
        image (and video) tokens, wrapped in the tokenizer's vision start/end tokens when it has them (Qwen)."""
        if getattr(self.processor, "chat_template", None):
            return build_prompt(self.processor, context, n_images, n_videos)
        tags = [self.processor.image_token] * n_images + [self.processor.video_token] * n_videos
        vocab = self._tokenizer.get_vocab()
        if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
            tags = [f"<|vision_start|> {tag} <|vision_end|>" for tag in tags]
        return "USER: " + "".join(f"{tag} " for tag in tags) + f"{context} ASSISTANT:"

    @staticmethod
    def _media(visuals, task: str) -> tuple[list, list]:
        """(images, videos) of one document: a PIL image is an image; a list of PIL images (the frames), a
        [frames, H, W, 3] array or a video file path (decoded by the processor) is a video."""
        import numpy as np
        from PIL import Image

        images, videos = [], []
        for v in visuals or []:
            if isinstance(v, Image.Image):
                images.append(v.convert("RGB"))
            elif isinstance(v, (list, tuple)) and v and all(isinstance(f, Image.Image) for f in v):
                videos.append([f.convert("RGB") for f in v])
            elif isinstance(v, np.ndarray) and v.ndim == 4:
                videos.append(v)
            elif isinstance(v, (str, os.PathLike)):
                videos.append(str(v))
            else:
                raise NotImplementedError(
                    f"task {task}: vtprune wrappers take PIL images and videos (a list of PIL frames, a [frames, H, "
                    f"W, 3] array or a video file path); got {type(v).__name__} (audio is not supported)"
                )
        return images, videos

    def _to_device(self, batch) -> dict:
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self._device)
                if torch.is_floating_point(v):
                    v = v.to(self._model.dtype)
            out[k] = v
        return out

    def _sync(self):
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # -- generation ----------------------------------------------------------------------------------------------
    def _generation_args(self, gen_kwargs: dict) -> tuple[dict, list]:
        g = dict(gen_kwargs or {})
        until = g.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        task_max_new = _as_int("max_new_tokens", g.pop("max_new_tokens", None))
        max_new = self.max_new_tokens or task_max_new or DEFAULT_MAX_NEW_TOKENS
        temperature = float(g.pop("temperature", 0) or 0)
        do_sample = g.pop("do_sample", None)
        do_sample = bool(do_sample) if do_sample is not None else temperature > 0
        top_p = g.pop("top_p", None)
        num_beams = int(g.pop("num_beams", 1) or 1)
        if g:
            logger.debug(f"{self.registered_name}: ignoring generation kwargs {sorted(g)}")
        gc = self._model.generation_config
        tok = self._tokenizer
        pad = gc.pad_token_id if gc.pad_token_id is not None else tok.pad_token_id
        eos = gc.eos_token_id if gc.eos_token_id is not None else tok.eos_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        args = dict(
            max_new_tokens=max_new, do_sample=do_sample, num_beams=num_beams, pad_token_id=pad, eos_token_id=eos
        )
        if do_sample:
            args["temperature"] = temperature
            if top_p is not None:
                args["top_p"] = float(top_p)
        return args, [u for u in until if u]

    @torch.no_grad()
    def _run_batch(self, items: list) -> list[str]:
        """items: (context, gen_kwargs, images, task, doc_id, videos), same gen_kwargs, image and video counts."""
        contexts = [it[0] for it in items]
        images = [im for it in items for im in it[2]]
        videos = [v for it in items for v in it[5]]
        texts = [self.build_prompt(c, len(it[2]), len(it[5])) for c, it in zip(contexts, items)]
        media = {"videos": videos} if videos else {}
        batch = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt", **media)
        inputs = self._to_device(batch)
        gen_args, until = self._generation_args(items[0][1])

        if self.time_prefill and self.prefill_latency_s is None:
            times = []
            for _ in range(4):  # the first run warms up (allocations, kernels) and is dropped
                self._sync()
                t0 = time.perf_counter()
                self._model(**inputs, use_cache=False)
                self._sync()
                times.append(time.perf_counter() - t0)
            self.prefill_latency_s = statistics.median(times[1:])
            self.prefill_latency_batch = len(items)

        self._sync()
        t0 = time.perf_counter()
        out = self._model.generate(**inputs, **gen_args)
        self._sync()
        elapsed = time.perf_counter() - t0

        n = len(items)
        new = out[:, inputs["input_ids"].shape[1] :]
        decoded = self._tokenizer.batch_decode(new, skip_special_tokens=True)
        answers = []
        for text in decoded:
            for stop in until:
                text = text.split(stop, 1)[0]
            answers.append(text.strip())

        visual = count_visual_tokens(self._model, inputs["input_ids"])
        stats = vtprune.get_stats(self._model) if self.pruning is not None else None
        if stats:
            kept = [int(k) for k in stats[-1]["tokens_after"]]
            if len(kept) != n:  # beam search expands rows: report the mean per sample
                kept = [sum(kept) / len(kept)] * n
        else:
            kept = visual
        flops = None
        if self.count_flops and not self._flops_failed:
            try:
                from vtprune.flops import count_prefill

                flops = count_prefill(self._model, inputs, stats)["total"] / n
            except Exception as exc:  # e.g. a family the FLOPs model does not know
                self._flops_failed = True
                logger.warning(f"{self.registered_name}: prefill FLOPs not counted ({exc})")
        pad = gen_args["pad_token_id"]
        gen_tokens = int((new != pad).sum()) if pad is not None else int(new.numel())
        for it, v, k in zip(items, visual, kept):
            self.records.append(
                {
                    "task": it[3],
                    "doc_id": it[4],
                    "visual_tokens": v,
                    "kept_tokens": k,
                    "prefill_flops": flops,
                    "latency_s": elapsed / n,
                    "gen_tokens": gen_tokens / n,
                }
            )
        return answers

    def generate_until(self, requests) -> list[str]:
        from tqdm import tqdm

        args = [req.args for req in requests]

        # Same generation settings together, longest prompts first (less padding, early OOM).
        def key(i):
            return json.dumps(args[i][1] or {}, sort_keys=True, default=str), -len(args[i][0]), i

        order = sorted(range(len(args)), key=key)
        results: list[str | None] = [None] * len(args)
        start = len(self.records)
        bar = tqdm(total=len(args), disable=self._rank != 0, desc=f"{self.registered_name} responding")
        pos = 0
        while pos < len(order):
            g = key(order[pos])[0]
            chunk = []
            while pos < len(order) and len(chunk) < self.batch_size and key(order[pos])[0] == g:
                chunk.append(order[pos])
                pos += 1
            items = []
            for i in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = args[i]
                doc = self.task_dict[task][split][doc_id]
                visuals = doc_to_visual(doc) if doc_to_visual is not None else []
                images, videos = self._media(visuals, task)
                items.append((context, gen_kwargs, images, task, doc_id, videos))
            # One processor call needs the same numbers of images and videos per prompt.
            by_count: dict[tuple, list] = {}
            for i, it in zip(chunk, items):
                by_count.setdefault((len(it[2]), len(it[5])), []).append((i, it))
            for group in by_count.values():
                for i, answer in zip([i for i, _ in group], self._run_batch([it for _, it in group])):
                    results[i] = answer
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), answer)
            bar.update(len(chunk))
        bar.close()
        self._log_metrics(self.records[start:])
        return results

    def _log_metrics(self, recs: list) -> None:
        """Report pruning statistics through lmms-eval's generation metrics (results JSON: ``throughput``)."""
        if not recs:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        elapsed = sum(r["latency_s"] for r in recs)
        tokens = sum(r["gen_tokens"] for r in recs)
        extra = {
            "total_requests": len(recs),
            "kept_visual_tokens": statistics.fmean(r["kept_tokens"] for r in recs),
            "visual_tokens": statistics.fmean(r["visual_tokens"] for r in recs),
        }
        if all(r["prefill_flops"] is not None for r in recs):
            extra["prefill_flops"] = statistics.fmean(r["prefill_flops"] for r in recs)
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=tokens,
            avg_speed=tokens / elapsed if elapsed > 0 else 0.0,
            additional_metrics=extra,
        )

    def clean(self):
        """lmms-eval calls this after every evaluation to free the model for LLM judges; ``keep_loaded = True``
        (set by run_lmms, which reuses the model for every configuration) keeps it."""
        if not self.keep_loaded:
            return super().clean()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def loglikelihood(self, requests):
        raise NotImplementedError(
            f"{self.registered_name} implements generate_until only: pick generation tasks "
            "(output_type: generate_until), not loglikelihood / multiple-choice ones"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{self.registered_name} does not implement multi-round generation")


_WRAPPER_ARGS = (
    "pretrained",
    "method",
    "keep_ratio",
    "keep_tokens",
    "layer",
    "positions",
    "schedule",
    "device",
    "device_map",
    "batch_size",
    "dtype",
    "max_new_tokens",
    "attn_implementation",
    "revision",
    "trust_remote_code",
    "time_prefill",
    "count_flops",
)


@register_model("vtprune_llava")
class VtpruneLlava(VtpruneLMM):
    """Alias kept from 0.x: ``vtprune`` restricted to the LLaVA families."""

    name = "vtprune_llava"
    prefix = "llava"


@register_model("vtprune_qwen2_5_vl")
class VtpruneQwen25VL(VtpruneLMM):
    """Alias kept from 0.x: ``vtprune`` restricted to the Qwen2-VL families."""

    name = "vtprune_qwen2_5_vl"
    prefix = "qwen"


def _aliases() -> dict:
    return {c.name: c for c in (VtpruneLMM, VtpruneLlava, VtpruneQwen25VL)}
