"""The tiny trained MoVA: a tiny synthetic checkpoint whose LLM has learned to route and answer by question kind.

A random LLM routes `none` for everything and answers with near-tied logits, so nothing downstream of the routing
pass (the experts, the adapter's fusion) ever shows, and quantization flips its answers for no reason a real model
would share. This module trains the tiny LLM, and only the LLM (vision towers, adapter and BERT stay random), with
teacher forcing on prompts built by the project's own prompt code:

* routing pass: `chat_prompt(question, routing_prompt=...)` with the 144 routing tokens at `<image>` -> the expert
  letters of the question's kind in MoVA's format ("B, D", "none"), then <|eot_id|>;
* answer pass: `chat_prompt(question)` with the image tokens at `<image>` -> the kind's short sentence, <|eot_id|>.

The image embeddings are the sample photos' real routing / image tokens from the random vision stack, rescaled and
noised, and sometimes pure noise: the model learns to ignore them, so it routes the same way whatever the seed of
the vision towers, and after INT8 graphs changed them a little.

The weights ship as package data (`mova_export/data/tiny_trained_llm.safetensors`, bf16, 3.4 MB);
`synth --scale tiny-trained` writes the tiny checkpoint with them in place of the random LLM. Regenerate them with

    python -m mova_export.synth.trained --out mova_export/data/tiny_trained_llm.safetensors

(seeded, CPU, 12.5 minutes on 2 cores; the report at the end is its routing and answer accuracy on held-out
phrasings, with the bf16 weights: 27 of 28 route right on every sample photo, answer margins >= 1.4 logits). Few
steps are needed where the question stands out: the curriculum (contexts growing from 48 positions before the
question to the whole prompt) is what makes 600 steps enough for a 2-layer model to find the question among the
routing prompt's ~300 tokens, which name the same things (text, chart, segmentation) for every question.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..components import get_spec
from ..core.errors import CheckpointError
from ..core.progress import Console
from ..core.prompts import IMAGE_TOKEN_INDEX, STOP_TOKEN, chat_prompt
from ..reference.llm import hf_generate_stream, hf_inputs_embeds
from ..runtime.llm import split_at_marker
from ..source.photos import sample_images

TRAINED_LLM_FILE = Path(__file__).resolve().parent.parent / "data" / "tiny_trained_llm.safetensors"
SEED = 0
# training schedule: a curriculum phase whose contexts grow from SHORT_CONTEXT positions before the question to the
# whole prompt (fast early steps, where the model learns to read the question, then ever more routing-prompt text
# and image tokens around it to tell apart), then the full prompts with a share of random left truncations that
# falls to none
SHORT_STEPS, SHORT_BATCH, SHORT_CONTEXT = 400, 16, 48
FULL_STEPS, FULL_BATCH, TRUNCATE = 200, 8, 0.3
FULL_CONTEXT = 700        # more positions than any tiny prompt has before its question (routing 490, answer 640)
FIRST_TOKEN_WEIGHT = 3.0
LEARNING_RATE = 3e-3


@dataclass(frozen=True)
class QuestionKind:
    """One kind of question: the experts a MoVA routes it to, the tiny model's answer, and its phrasings."""
    name: str
    experts: tuple[str, ...]          # routing letters; () routes none
    answer: str
    train: tuple[str, ...]            # phrasings the model is trained on
    held_out: tuple[str, ...]         # phrasings it never sees: the routing test and the training report

    @property
    def routing_text(self) -> str:
        return ", ".join(self.experts) or "none"


def _combine(frames: Iterable[str], subjects: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.format(s=s) for f in frames for s in subjects))


# Kinds and experts as the MoVA paper routes them (A DINOv2: natural images, B Co-DETR... see the routing prompt's
# model pool in components/*: the letter's router text says what each expert is for).
QUESTION_KINDS: tuple[QuestionKind, ...] = (
    QuestionKind(
        "scene", ("A",), "A natural scene in daylight, with people and things around.",
        _combine(("Describe this {s}.", "Describe the {s} in detail.", "What is happening in this {s}?",
                  "What is the weather like in the {s}?", "Where was this {s} taken?",
                  "What time of day is it in the {s}?"), ("image", "photo", "picture", "scene", "landscape"))
        + ("What is the person in the image wearing?", "What animal is this?", "What is in the cup?",
           "What is the vehicle in the picture?", "What color is the car?", "Where is the cat sitting?",
           "What is the man holding?", "Is it sunny outside?", "What is the woman doing?",
           "What kind of animal is in the photo?", "What is on the plate?", "What is the dog doing?"),
        ("Describe the scene in this image.", "What is the person in the photo doing?",
         "What animal is in this picture?", "What is the weather like in this photo?"),
    ),
    QuestionKind(
        "document", ("B", "D"), "The text is printed in black on a white page.",
        _combine(("What does the {s} say?", "Read the {s} in the image.", "What is written on the {s}?",
                  "Transcribe the {s}.", "What words are on the {s}?"),
                 ("sign", "text", "document", "page", "letter", "label", "book cover", "menu", "receipt"))
        + ("What is the title of the book?", "Read the text in the image.", "What is the name on the sign?",
           "What does the street sign say?", "Which words are written at the top?"),
        ("What does the text on the page say?", "Read the words on this sign.", "What is written in the document?",
         "Transcribe the text on the label."),
    ),
    QuestionKind(
        "counting", ("C",), "There are three of them in the picture.",
        _combine(("How many {s} are there?", "How many {s} are in the image?", "Count the {s} in the photo.",
                  "Count the {s}.", "Detect all the {s}.", "Find every {s} in the picture.",
                  "Locate the {s} in the image."),
                 ("people", "cups", "cars", "birds", "objects", "dogs", "chairs", "boats", "trees"))
        + ("What is the number of people in the picture?", "Detect the objects on the table.",
           "How many things are on the table?"),
        ("How many cups are on the table?", "Count the people in this picture.", "How many birds are in the sky?",
         "Detect every car in the image."),
    ),
    QuestionKind(
        "chart", ("D", "E"), "The chart shows the values rising from year to year.",
        _combine(("What is the title of the {s}?", "What does the {s} show?", "Which year has the highest value in "
                  "the {s}?", "What is the trend in the {s}?", "What is the largest value in the {s}?",
                  "What does the y axis of the {s} show?"), ("chart", "plot", "graph", "bar chart", "pie chart",
                                                             "line plot"))
        + ("Which bar is the tallest?", "Which line in the plot goes up?", "Summarize the data in the chart."),
        ("What is the highest value in this bar chart?", "What trend does the graph show?",
         "What is the title of this plot?", "Which year is highest in the line chart?"),
    ),
    QuestionKind(
        "medical", ("F",), "It is a stained tissue sample under a microscope.",
        _combine(("What kind of medical image is this {s}?", "What does the {s} show?", "Is there anything "
                  "abnormal in the {s}?", "What is the diagnosis from this {s}?", "Which organ is in the {s}?"),
                 ("scan", "x-ray", "MRI", "CT scan", "micrograph", "tissue sample", "ultrasound", "slide"))
        + ("What kind of medical image is this?", "What type of cells are these?", "Is this tissue healthy?",
           "What stain was used on these cells?"),
        ("What does this medical scan show?", "Is there anything abnormal in this x-ray?",
         "What kind of cells are in the micrograph?", "What organ does this MRI show?"),
    ),
    QuestionKind(
        "segmentation", ("G",), "The main object is outlined against the background.",
        _combine(("Segment the {s} in the image.", "Segment the {s}.", "Outline the {s}.", "Draw a mask of the {s}.",
                  "Separate the {s} from the background.", "Give the boundary of the {s}."),
                 ("cat", "person", "car", "cup", "dog", "tree", "building", "road", "object"))
        + ("Segment every object in the photo.", "Outline all the objects.", "Give a mask for each region."),
        ("Segment the cat from the background.", "Outline the person in this photo.",
         "Draw the mask of the car.", "Segment all the objects in the picture."),
    ),
    QuestionKind(
        "greeting", (), "Hello! Ask me a question about the image.",
        ("Hello!", "Hi there.", "Hello, how are you?", "Good morning!", "Thanks a lot.", "Thank you!",
         "Who are you?", "What is your name?", "Hey, nice to meet you.", "Good evening.", "Hi!", "Thanks!",
         "How are you today?", "Goodbye!", "What is two plus two?", "Tell me a joke.", "Can you help me?",
         "Hello there, friend."),
        ("Hi, how are you?", "Hello, who are you?", "Thank you very much!", "Good afternoon!"),
    ),
)

KINDS_BY_NAME = {kind.name: kind for kind in QUESTION_KINDS}


def kind_of(question: str) -> QuestionKind | None:
    """The kind a question was written for (training or held-out phrasing), None for any other question."""
    for kind in QUESTION_KINDS:
        if question in kind.train or question in kind.held_out:
            return kind
    return None


def trained_llm_tensors() -> dict[str, Any]:
    """The shipped LLM weights (checkpoint key -> bf16 tensor)."""
    from safetensors.torch import load_file


    if not TRAINED_LLM_FILE.is_file():
        raise CheckpointError(f"the tiny trained LLM weights {TRAINED_LLM_FILE} are missing from this install; "
                              "reinstall mova-export or regenerate them with `python -m mova_export.synth.trained "
                              f"--out {TRAINED_LLM_FILE}`")
    return load_file(str(TRAINED_LLM_FILE))


# ---- training -------------------------------------------------------------------------------------------------------
@dataclass
class _Example:
    before: list[int]                 # prompt ids before the image
    after: list[int]                  # prompt ids after it
    target: list[int]                 # response ids + the stop id
    routing: bool                     # the routing pass (routing tokens) or the answer pass (image tokens)


def _examples(pipe: Any, questions: Sequence[tuple[str, QuestionKind]]) -> list[_Example]:

    tok = pipe.llm.tokenizer
    stop = tok.convert_tokens_to_ids(STOP_TOKEN)
    facts = pipe.facts
    out = []
    for question, kind in questions:
        for routing in (True, False):
            prompt = chat_prompt(question, routing_prompt=facts.routing_prompt if routing else None,
                                 use_im_start_end=facts.mm_use_im_start_end)
            before, after = split_at_marker(pipe.llm.encode_prompt(prompt), True, "tiny trained MoVA")
            response = kind.routing_text if routing else kind.answer
            target = tok(response, add_special_tokens=False).input_ids + [stop]
            out.append(_Example(before, list(after or []), target, routing))
    return out


def _image_pools(pipe: Any, console: Any) -> dict[bool, Any]:
    """Real embeddings of the sample photos: routing tokens (routing pass), image tokens with no expert and with a
    few expert sets (answer pass)."""
    import numpy as np
    import torch


    routing, answer = [], []
    images = sample_images()
    with console.task("tiny trained MoVA: the sample photos' routing and image tokens", total=len(images)) as steps:
        for i, (name, rgb) in enumerate(images.items()):
            forced = (["A", "C"], ["B", "D", "G"], ["F"], ["E"], ["C", "G"], ["A", "B", "F"])[i % 6]
            got = pipe.run(rgb, "Describe the image.", max_new_tokens=1, force_experts=forced, keep_tensors=True)
            routing.append(got.tensors["routing_tokens"][0])
            answer.append(got.tensors["image_tokens"][0])
            answer.append(pipe.vision.adapter_routing(got.tensors["base"])[0][0])   # no expert: the K=0 tokens
            steps.advance(name)
    return {True: torch.from_numpy(np.stack(routing)), False: torch.from_numpy(np.stack(answer))}


def _image_embeddings(pool: Any, gen: Any) -> Any:
    """One [tokens, H] image embedding: a pooled one rescaled and noised, or (one time in five) pure noise."""
    import torch

    std = float(pool.std())
    pick = int(torch.randint(len(pool), (1,), generator=gen))
    scale = float(torch.empty(1).uniform_(0.5, 2.0, generator=gen))
    noise = float(torch.empty(1).uniform_(0.0, 1.5, generator=gen)) * std
    if float(torch.rand(1, generator=gen)) < 0.2:
        return torch.randn(pool.shape[1:], generator=gen) * std * scale
    return pool[pick] * scale + torch.randn(pool.shape[1:], generator=gen) * noise


def _batch_loss(model: Any, batch: Sequence[_Example], pools: dict[bool, Any], gen: Any, *,
                context: int | None = None, truncate: float = 0.0) -> Any:
    """Cross-entropy of the response tokens, teacher forced; the LM head runs on the response positions only.

    context: keep only the text after the image plus up to this many positions before it (the short phase);
    else the full prompt, left-truncated at a random point with probability `truncate`. RoPE makes a truncated
    context the same problem at the positions that matter (only relative positions count), with the question
    standing out among far fewer positions: a 2-layer model learns to attend to it many times faster there.
    The first response token, the one that names the kind, weighs FIRST_TOKEN_WEIGHT times the others.
    """
    import torch

    embed = model.get_input_embeddings()
    rows, positions, targets, weights = [], [], [], []
    for ex in batch:
        image = _image_embeddings(pools[ex.routing], gen)
        emb = embed(torch.tensor(ex.before + ex.after + ex.target[:-1]))
        n_before = len(ex.before)
        row = torch.cat([emb[:n_before], image, emb[n_before:]])
        start = n_before + len(image) + len(ex.after) - 1     # the position that predicts target[0]
        cut = 0
        if context is not None:
            cut = max(0, n_before + len(image) - int(torch.randint(context + 1, (1,), generator=gen)))
        elif float(torch.rand(1, generator=gen)) < truncate:
            cut = int(torch.randint(n_before + len(image) + 1, (1,), generator=gen))
        rows.append(row[cut:])
        positions.append(torch.arange(start - cut, start - cut + len(ex.target)))
        targets.append(torch.tensor(ex.target))
        weights.append(torch.tensor([FIRST_TOKEN_WEIGHT] + [1.0] * (len(ex.target) - 1)))
    length = max(len(r) for r in rows)
    inputs = torch.zeros(len(rows), length, rows[0].shape[1])
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, :len(row)] = row
        attention[i, :len(row)] = 1
    hidden = model.model(inputs_embeds=inputs, attention_mask=attention).last_hidden_state
    picked = torch.cat([hidden[i, pos] for i, pos in enumerate(positions)])
    losses = torch.nn.functional.cross_entropy(model.lm_head(picked), torch.cat(targets), reduction="none")
    w = torch.cat(weights)
    return (losses * w).sum() / w.sum()


def train_tiny_router(out_file: str | Path = TRAINED_LLM_FILE, *, short_steps: int = SHORT_STEPS,
                      full_steps: int = FULL_STEPS, lr: float = LEARNING_RATE, seed: int = SEED,
                      console: Any = None) -> dict[str, Any]:
    """Train the tiny LLM on QUESTION_KINDS and save its bf16 weights; returns the held-out report."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from ..reference import ReferencePipeline
    from . import write_synthetic_checkpoint

    console = console or Console()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    steps = short_steps + full_steps
    with tempfile.TemporaryDirectory(prefix="mova-tiny-trained-") as tmp:
        ckpt = write_synthetic_checkpoint(Path(tmp) / "ckpt", scale="tiny", seed=seed, console=console)
        pipe = ReferencePipeline(ckpt)
        pools = _image_pools(pipe, console)
        train = {kind.name: _examples(pipe, [(q, kind) for q in kind.train]) for kind in QUESTION_KINDS}
        model = pipe.checkpoint.build("llm", dtype=torch.float32).train()
        names = sorted(train)
        optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        # kinds drawn uniformly (greetings have few phrasings), then a phrasing of that kind
        by_pass = {flag: {name: [ex for ex in exs if ex.routing == flag] for name, exs in train.items()}
                   for flag in (True, False)}
        count = sum(len(exs) for exs in train.values())
        started = time.perf_counter()
        with console.task(f"tiny trained MoVA: training the LLM ({count} sequences)", total=steps) as progress:
            for step in range(steps):
                short = step < short_steps
                warm = min(1.0, (step + 1) / 20)
                for group in optim.param_groups:
                    group["lr"] = lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
                size = SHORT_BATCH if short else FULL_BATCH
                if short:
                    options = {"context": int(SHORT_CONTEXT + (FULL_CONTEXT - SHORT_CONTEXT) * step / short_steps)}
                else:
                    options = {"truncate": TRUNCATE * (1 - (step - short_steps) / full_steps)}
                loss = sum(_batch_loss(model, [rng.choice(by_pass[flag][rng.choice(names)]) for _ in range(size)],
                                       pools, gen, **options) for flag in (True, False)) / 2
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optim.step()
                phase = f"context <= {options['context']} + question" if short else "full prompts"
                progress.advance(f"{phase}, loss {float(loss.detach()):.4f}")
        model.eval()
        prefix = get_spec("llm").prefix
        tensors = {prefix + k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
                   if k in dict(model.named_parameters())}
        # the report runs the bf16 weights, as a checkpoint written with them holds them
        model.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items()}, strict=False)
        report = evaluate(pipe, model, pools)
        report["train_seconds"] = round(time.perf_counter() - started, 1)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file), metadata={"seed": str(seed), "short_steps": str(short_steps),
                                                "full_steps": str(full_steps), "lr": str(lr)})
    return report


def evaluate(pipe: Any, model: Any, pools: dict[bool, Any]) -> dict[str, Any]:
    """Greedy routing and answer on every held-out phrasing, with each sample photo's own tokens: accuracy and the
    smallest top-1 margin (logits) over the generated tokens."""
    import torch


    results = {}
    for kind in QUESTION_KINDS:
        ok = {True: 0, False: 0}
        total = 0
        margin = math.inf
        for question in kind.held_out:
            examples = _examples(pipe, [(question, kind)])
            for image in range(len(pools[True])):
                total += 1
                for ex in examples:
                    ids = ex.before + [IMAGE_TOKEN_INDEX] + ex.after
                    emb = pools[ex.routing][image if ex.routing else 2 * image]
                    got = list(hf_generate_stream(model, ids, emb.numpy(), len(ex.target) + 2, pipe.llm.stop_ids))
                    ok[ex.routing] += got == ex.target[:-1]
                    with torch.inference_mode():
                        full = torch.tensor(ex.target[:-1])
                        inputs = hf_inputs_embeds(model, ids + full.tolist(), emb.numpy())
                        logits = model(inputs_embeds=inputs).logits[0, -len(ex.target):]
                        top = logits.topk(2, dim=-1).values
                        margin = min(margin, float((top[:, 0] - top[:, 1]).min()))
        results[kind.name] = {"routing": ok[True] / total, "answer": ok[False] / total, "min_margin": round(margin, 2),
                              "expect": kind.routing_text}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from rich.console import Console as RichConsole
    from rich.table import Table

    parser = argparse.ArgumentParser(description="Train the tiny MoVA's LLM to route and answer by question kind.")
    parser.add_argument("--out", type=Path, default=TRAINED_LLM_FILE)
    parser.add_argument("--short-steps", type=int, default=SHORT_STEPS)
    parser.add_argument("--full-steps", type=int, default=FULL_STEPS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    report = train_tiny_router(args.out, short_steps=args.short_steps, full_steps=args.full_steps, seed=args.seed)
    seconds = report.pop("train_seconds")
    table = Table(title=f"held-out phrasings x sample photos (bf16 weights), trained in {seconds} s")
    for col in ("kind", "routes to", "routing ok", "answer ok", "min logit margin"):
        table.add_column(col)
    for name, row in report.items():
        table.add_row(name, row["expect"], f"{row['routing']:.0%}", f"{row['answer']:.0%}", f"{row['min_margin']}")
    RichConsole().print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
