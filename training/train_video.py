"""Fine-tune the embedded Qwen2.5-VL image model into a video model on the clips of ``eval/data/video.py``.

    python -m training.train_video --recipe --out eval/models/qwen2_5_vl-tiny-sortofclevr-video
    (from the root of a clone, with vtprune installed: training/ is not part of the installed package)

Recipe:

* Start from ``qwen2_5_vl-tiny-sortofclevr``, whose tower already makes colour, shape, position and counts linearly
  readable on every object token.  A clip holds each state for two frames, the tower's temporal patch, so the tokens
  of each temporal group are exactly the image model's tokens of that state: no new vision training is needed and
  the tower stays frozen.  8 frames -> 4 groups x 150 tokens = 600 visual tokens per clip.
* The tokenizer gains the video questions' words (``VIDEO_WORDS``), appended so every old token keeps its id; their
  new embedding rows are unit-variance like the others (seeded).
* ``tokens_per_second`` is set so that a plain list of frames (which the processor takes as 24 fps: 1/12 s per
  group) puts consecutive temporal groups 2 M-RoPE steps apart; with the stock 4 the groups' time ids would be
  0, 0, 0, 1 and the LLM could not tell the states apart.
* The LLM learns from sequences ``clip, Q1 A1, ..., Qn An`` (question turns in shuffled rounds of ``--qa-types``, no
  question repeated, every answer supervised; the first turn is exactly the evaluation prompt), with eval/train.py's
  stage-B loop.  Every ``--blank-every``-th clip is blank with its answers kept, so that on a clip showing nothing
  the model answers from the prior.
* Per-token probes (``--probe-weight``) teach every object token its object's clip-level facts at an early layer,
  so a multi-frame question becomes the image model's lookup; see ``PROBES``.
* ``--recipe`` replays the recorded runs (``RECIPES``); each run after the first continues the previous one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vtprune.eval.catalog import VIDEO_MODELS, model_dir
from vtprune.eval.data.image import COLOUR_NAMES
from vtprune.eval.data.video import (
    CLIP_CAPTION_QUESTION,
    DEFAULT_FRAMES,
    VIDEO_QUESTION_TYPES,
    VIDEO_WORDS,
    ask_video,
    clip_caption,
    make_video_split,
    random_clip,
    video_answer_prior,
    video_seed,
)
from vtprune.eval.harness.predict import evaluate_video
from vtprune.eval.models import build_video_prompt

from . import train as T

VIDEO_MODEL = VIDEO_MODELS[0]

BASE_MODEL = "qwen2_5_vl-tiny-sortofclevr"
# 24 fps (the processor's default for frames without metadata) x 2 frames per group x this = 2 positions per group
TOKENS_PER_SECOND = 24
# run 1: question answering only; run 2 continues it with the per-token probes on new clips (61 % multi-frame);
# run 3 continues run 2 with class-balanced probes, the right-side share and frame count read one layer earlier as
# stepping stones, and the multi-frame question types drawn twice as often (89 % multi-frame)
RECIPES = [
    "--steps 700 --batch 8 --lr 1e-3 --qa-turns 12 --blank-every 8 --eval-every 100",
    "--steps 600 --batch 8 --lr 1e-3 --qa-turns 12 --blank-every 8 --probe-weight 1 --probe-layer 2 "
    "--stream 5 --eval-every 100",
    "--steps 1200 --batch 8 --lr 1e-3 --qa-turns 12 --qa-types moved,moved,frames,frames,appeared,appeared,"
    "ended,shape,side --blank-every 8 --probe-weight 1 --probe-balance --probe-layer 2 "
    "--aux-probes side_frac,frames --aux-layer 1 --stream 8 --eval-every 100",
]


# Per-token probes on the LLM's hidden states at the video tokens (``--probe-layer``): every object token is taught
# its object's clip-level facts, so each multi-frame question becomes the image model's lookup ("find the token by
# one attribute, read another"; see eval/train.py's stage A) instead of a comparison across temporal groups that the
# question-answer loss alone taught slowly (the first run: ~65 % after 500 steps).
# moved (0/1), frames showing it (2/4/6/8 -> 0..3), state it first appears in, appeared last (0/1), ends right (0/1).
# side_frac: the share of the states showing it in which it is on the right (0, 1/4, ..., 1 -> 0..4): a stepping
# stone read earlier (``--aux-probes``/``--aux-layer``), since an object moved exactly when that share is neither 0
# nor 1 (the mover crosses the mid-line) and the object tokens already carry their own side linearly.
PROBES = {"moved": 2, "frames": 4, "first_state": 4, "appeared_last": 2, "ends_right": 2, "side_frac": 5}


def _side_frac(clip, colour: str) -> int:
    sides = [o.side == "right" for o in clip.track(colour) if o is not None]
    return round(4 * sum(sides) / len(sides))


def probe_targets(clip) -> torch.Tensor:
    """[states * tokens per state, len(PROBES)] targets of the clip's video tokens (-100 off objects)."""
    last, movers = clip.appeared_last(), clip.movers()
    facts = {
        c: [
            int(c in movers),
            clip.frames_showing(c) // 2 - 1,
            clip.first_state(c),
            int(c == last),
            int(clip.end_side(c) == "right"),
            _side_frac(clip, c),
        ]
        for c in clip.colours()
    }
    out = []
    for state in clip.states:
        colour = T.dense_targets(state, "qwen")[1][:, 0]  # colour index of the object a token covers, -100 off
        t = torch.full((colour.shape[0], len(PROBES)), -100, dtype=torch.long)
        for i in (colour >= 0).nonzero().flatten().tolist():
            t[i] = torch.tensor(facts[COLOUR_NAMES[colour[i]]])
        out.append(t)
    return torch.cat(out)


def _balanced_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with each class present weighted by the inverse of its share of ``target``: a rare class (the one
    mover among several still objects) counts as much as the common one, so its probe cannot sit at the base rate."""
    counts = torch.bincount(target, minlength=logits.shape[-1]).float()
    weight = torch.where(
        counts > 0, counts.sum() / (counts * (counts > 0).sum()).clamp(min=1), torch.zeros_like(counts)
    )
    return F.cross_entropy(logits, target, weight=weight)


def _balanced_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    recalls = [(pred[target == c] == c).float().mean().item() for c in target.unique()]
    return sum(recalls) / len(recalls)


def probe_loss_fn(
    model,
    heads,
    layer: int,
    weight: float,
    log=None,
    every: int = 25,
    balance: bool = False,
    names=tuple(PROBES),
    aux_layer: int | None = None,
    aux_names=(),
):
    """LM loss plus ``weight`` x the probes' cross-entropy on the video tokens: ``names`` at decoder layer
    ``layer``'s output, ``aux_names`` at ``aux_layer``'s (their accuracies logged every ``every`` calls, balanced
    ones with ``balance``, which also weights each probe's classes to equal shares). ``heads``: one per name, in
    the order ``names + aux_names``."""
    calls = [0]
    ce = _balanced_ce if balance else F.cross_entropy
    score = _balanced_accuracy if balance else (lambda p, t: (p == t).float().mean().item())
    plan = [(layer, n) for n in names] + [(aux_layer, n) for n in aux_names]
    plan = [(at, name, list(PROBES).index(name)) for at, name in plan]  # target column of each probe

    def loss_fn(inputs):
        targets = inputs.pop("probe_targets").flatten(0, 1)
        out = model(**inputs, output_hidden_states=True)
        video = inputs["input_ids"] == model.config.video_token_id
        aux, accs = 0.0, {}
        for (at, name, j), head in zip(plan, heads):
            on = targets[:, j] != -100
            if on.any():
                logits = head(out.hidden_states[at][video][on])
                aux = aux + ce(logits, targets[on, j])
                accs[f"{name}@{at}"] = round(score(logits.argmax(-1), targets[on, j]), 3)
        if log is not None and calls[0] % every == 0:
            log(f"probes {accs}")
        calls[0] += 1
        return out.loss + weight * aux

    return loss_fn


def make_video_batch(
    processor, seed, step, batch, stream, n_frames, qa_turns, qa_types, blank_every, caption, probes: bool = False
):
    """One batch of training clips (a seed stream of the train split) with their question turns, and with
    ``caption`` a last turn describing the clip state by state (not on blank clips)."""
    videos, texts, targets = [], [], []
    for j in range(batch):
        i = step * batch + j
        rng = random.Random(video_seed("train", seed, (stream << 40) + i))
        clip = random_clip(rng, n_frames)
        blank = blank_every > 0 and i % blank_every == 0
        texts.append(
            T.sequence_text(
                processor,
                clip,
                rng,
                qa_turns,
                qa_types,
                with_caption=caption and not blank,
                ask_fn=ask_video,
                prompt_fn=build_video_prompt,
                caption_fn=clip_caption,
                caption_question=CLIP_CAPTION_QUESTION,
            )
        )
        videos.append(clip.blank_frames() if blank else clip.frames())
        if probes:  # a blank clip has no object tokens
            targets.append(torch.full_like(probe_targets(clip), -100) if blank else probe_targets(clip))
    inputs = T.supervised_inputs(processor, texts, videos=videos)
    if probes:
        inputs["probe_targets"] = torch.stack(targets)
    return inputs


def insert_layers(model, at: int, n: int, seed: int):
    """Grow the LLM by ``n`` decoder layers inserted before layer ``at``, each an exact identity at the start (its
    attention output and MLP down projections are zero), so the grown model answers as before and the new layers
    have room to compute the clip-level facts between the image model's feature layers and its lookup layers."""
    lm = model.model.language_model
    cfg = model.config.text_config
    torch.manual_seed(seed + 5)
    new = [type(lm.layers[0])(cfg, 0) for _ in range(n)]
    for layer in new:  # fresh (distinct) projections, so the new layers do not learn in lockstep
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    layers = list(lm.layers[:at]) + new + list(lm.layers[at:])
    lm.layers = torch.nn.ModuleList(layers)
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    cfg.num_hidden_layers = len(layers)
    cfg.layer_types = [cfg.layer_types[0]] * len(layers)
    return model


def load_start(init_from: Path, processor, seed: int, log):
    """The model to fine-tune, its vocabulary grown to the processor's tokenizer (old ids kept)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(init_from, local_files_only=True, dtype=torch.float32)
    old = AutoTokenizer.from_pretrained(init_from, local_files_only=True).get_vocab()
    new = processor.tokenizer.get_vocab()
    assert all(new[w] == i for w, i in old.items()), "the video tokenizer must keep the base model's token ids"
    n_old = model.get_input_embeddings().weight.shape[0]
    if len(new) > n_old:
        model.resize_token_embeddings(len(new), mean_resizing=False)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[n_old:] = torch.randn(len(new) - n_old, emb.shape[1], generator=gen)
            model.get_output_embeddings().weight[n_old:] = 0.0  # new words are never answers
        log(f"vocabulary {n_old} -> {len(new)}")
    model.config.vision_config.tokens_per_second = TOKENS_PER_SECOND
    return model


def pin_processor(processor, model) -> None:
    """Settings saved with the model: the tokenizer's length limit is the LLM's context (a clip's prompt is ~620
    tokens, over the tokenizer's default 512 warning), and the video processor's per-frame pixel cap is pinned off
    (the frames are small; pinning keeps the token count whatever transformers' default becomes, and its warning
    quiet)."""
    processor.tokenizer.model_max_length = model.config.text_config.max_position_embeddings
    processor.video_processor.cap_pixels_per_frame = False


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--init-from", type=Path, default=None, help=f"default: the shipped {BASE_MODEL}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--qa-turns", type=int, default=12)
    ap.add_argument(
        "--qa-types",
        default=",".join(VIDEO_QUESTION_TYPES),
        help="comma list of question types making one round of turns (repeats weight a type)",
    )
    ap.add_argument("--projector-lr-scale", type=float, default=0.0)
    ap.add_argument("--blank-every", type=int, default=8)
    ap.add_argument("--probe-weight", type=float, default=0.0, help="weight of the per-token probes (0: none)")
    ap.add_argument("--probe-layer", type=int, default=2, help="decoder layer whose output the probes read")
    ap.add_argument("--probe-balance", action="store_true", help="weight each probe's classes to equal shares")
    ap.add_argument(
        "--probes",
        default="moved,frames,first_state,appeared_last,ends_right",
        help="comma list of the probes read at --probe-layer",
    )
    ap.add_argument("--aux-probes", default="", help="comma list of probes read at --aux-layer (stepping stones)")
    ap.add_argument("--aux-layer", type=int, default=1, help="decoder layer whose output the aux probes read")
    ap.add_argument(
        "--insert-layers", type=int, default=0, help="grow the LLM by this many identity-initialised layers"
    )
    ap.add_argument("--insert-at", type=int, default=2, help="decoder index the new layers are inserted before")
    ap.add_argument("--caption", type=int, default=0, help="1: end each sequence with the state-by-state caption")
    ap.add_argument("--stream", type=int, default=4, help="seed stream of the training clips")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-size", type=int, default=120)
    ap.add_argument("--test-size", type=int, default=600)
    ap.add_argument("--recipe", action="store_true", help="replay RECIPES; other training flags are ignored")
    return ap


def run_recipe(seed: int, out: Path, threads: int) -> dict:
    info, previous = None, None
    for i, extra in enumerate(RECIPES):
        target = out if i == len(RECIPES) - 1 else out / f"run{i + 1}"
        argv = ["--seed", str(seed), "--threads", str(threads), *extra.split(), "--out", str(target)]
        info = main(argv + (["--init-from", str(previous)] if previous else []))
        previous = target
    return info


def main(argv=None):
    args = parser().parse_args(argv)
    out_dir = args.out or model_dir(VIDEO_MODEL)
    if args.recipe:
        return run_recipe(args.seed, out_dir, args.threads)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    def log(msg):
        print(f"{time.time() - t_start:7.0f}s {msg}", flush=True)

    init_from = args.init_from or model_dir(BASE_MODEL)
    processor = T.build_processor("qwen", VIDEO_WORDS, video=True)
    model = load_start(init_from, processor, args.seed, log)
    if args.insert_layers:
        insert_layers(model, args.insert_at, args.insert_layers, args.seed)
        log(f"LLM grown to {model.config.text_config.num_hidden_layers} layers")
    pj = init_from / "training.json"
    start_record = json.loads(pj.read_text()) if pj.exists() else {}
    previous = start_record if start_record.get("name") == VIDEO_MODEL else None
    qa_types = tuple(args.qa_types.split(","))
    assert all(t in VIDEO_QUESTION_TYPES for t in qa_types), qa_types
    val = make_video_split("validation", args.val_size, args.seed, args.frames)

    def batch_fn(step):
        return make_video_batch(
            processor,
            args.seed,
            step,
            args.batch,
            args.stream,
            args.frames,
            args.qa_turns,
            qa_types,
            args.blank_every,
            bool(args.caption),
            args.probe_weight > 0,
        )

    loss_fn, heads = None, torch.nn.ModuleList()
    if args.probe_weight > 0:
        torch.manual_seed(args.seed + 3)
        names = tuple(filter(None, args.probes.split(",")))
        aux_names = tuple(filter(None, args.aux_probes.split(",")))
        bad = [n for n in names + aux_names if n not in PROBES]
        if bad:
            raise SystemExit(f"unknown probe(s) {bad}; allowed: {', '.join(PROBES)}")
        heads = torch.nn.ModuleList(
            torch.nn.Linear(model.config.text_config.hidden_size, PROBES[n]) for n in names + aux_names
        )
        loss_fn = probe_loss_fn(
            model,
            heads,
            args.probe_layer,
            args.probe_weight,
            log,
            balance=args.probe_balance,
            names=names,
            aux_layer=args.aux_layer,
            aux_names=aux_names,
        )

    def eval_fn(m):
        m.eval()
        res = evaluate_video(m, processor, val, batch_size=30)
        m.train()
        return res

    t_b, val_res = T.stage_b(
        model,
        "qwen",
        processor,
        args.seed,
        args.steps,
        args.batch,
        args.lr,
        log,
        None,
        args.eval_every,
        out_dir,
        args.qa_turns,
        projector_lr_scale=args.projector_lr_scale,
        batch_fn=batch_fn,
        eval_fn=eval_fn,
        loss_fn=loss_fn,
        extra_params=heads.parameters(),
    )
    train_time = time.time() - t_start
    model.eval()
    pin_processor(processor, model)
    T.save(model, processor, out_dir)
    t0 = time.time()
    test = make_video_split("test", args.test_size, 0, args.frames)
    full = evaluate_video(model, processor, test, batch_size=30)
    blank = evaluate_video(model, processor, test, batch_size=30, blank=True)
    prior = {k: round(v, 4) for k, v in video_answer_prior(test).items()}
    t_eval = time.time() - t0
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    tokens = int(
        processor(videos=[test[0].frames], text=[build_video_prompt(processor, test[0].question)], return_tensors="pt")[
            "video_grid_thw"
        ].prod()
        // 4
    )
    log(f"test (full clips):  {json.dumps(full)}")
    log(f"test (blank clips): {json.dumps(blank)}")
    log(f"answer prior: {json.dumps(prior)}")
    log(f"training {train_time:.0f}s, eval {t_eval:.0f}s, {tokens} visual tokens per clip, {size / 1e6:.2f} MB")
    base_time = start_record.get("train_time_s_including_previous_runs", 0.0)
    info = {
        "name": VIDEO_MODEL,
        "model_class": type(model).__name__,
        "seed": args.seed,
        "command": "python -m training.train_video " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_model": start_record.get("name"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": size,
        "frames_per_clip": args.frames,
        "visual_tokens_per_clip": tokens,
        "time_s": {"train": round(train_time, 1), "eval": round(t_eval, 1)},
        # the video runs alone, and with the image model's own training before them
        "train_time_s_video_runs": round(train_time + (previous or {}).get("train_time_s_video_runs", 0.0), 1),
        "train_time_s_including_previous_runs": round(train_time + base_time, 1),
        **T.results_record(args.threads, len(test), previous, full, blank, "blank_clip_accuracy", prior, val_res),
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
