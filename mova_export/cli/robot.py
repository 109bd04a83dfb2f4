"""`mova-export replay`: a ROS 2 bag through a bundle (robot/replay.py). Torch-free: it runs on the device."""
from __future__ import annotations

from pathlib import Path

import click

from .common import one_line_errors
from .run import THREADS_HELP, _log, _options, runtime_choices


def _questions(questions: tuple[str, ...], questions_file: Path | None) -> list[str]:
    out = list(questions)
    if questions_file is not None:
        if not questions_file.is_file():
            raise click.BadParameter(f"{questions_file} does not exist; pass a text file with one question a line",
                                     param_hint="--questions-file")
        out += [line.strip() for line in questions_file.read_text().splitlines() if line.strip()]
    if not out:
        raise click.UsageError("no question; pass --question Q (repeatable) or --questions-file F")
    return out


@click.command("replay")
@click.argument("bag", type=click.Path(path_type=Path))
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="The bundle that answers.")
@click.option("--image-topic", required=True, help="sensor_msgs/Image or CompressedImage topic, e.g. /camera/image_raw.")
@click.option("--question", "questions", multiple=True, help="A question asked of every answered frame (repeat).")
@click.option("--questions-file", type=click.Path(path_type=Path), default=None,
              help="A text file with one question a line (added to --question).")
@click.option("--every", type=int, default=None, help="Answer every N-th frame (default: every frame).")
@click.option("--rate", "rate_hz", type=float, default=None, help="Answer at most HZ frames a second of bag time "
              "(by header stamps).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for answers/ (a bag with /mova/answer), answers.jsonl, replay.json, latency.png.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Answer length cap.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier replay's outputs in --out.")
@runtime_choices
@click.option("--llm-threads", type=int, default=None, help=THREADS_HELP)
@one_line_errors
def replay(bag: Path, bundle: Path, image_topic: str, questions: tuple[str, ...], questions_file: Path | None,  # noqa: PLR0913 (click: an option each)
           every: int | None, rate_hz: float | None, out_dir: Path, max_new_tokens: int, overwrite: bool,
           backend: str, device: str, precision: str | None, llm_quant: str | None, trusted_key: Path | None,
           llm_threads: int | None) -> None:
    """Answer questions about the frames of a ROS 2 bag (MCAP or sqlite3), as the ROS 2 node would live."""
    try:
        from ..robot.loop import Pacer
        from ..robot.replay import open_bag, prepare_out, replay_bag
    except ImportError as exc:
        raise click.ClickException(f"replay needs rosbags ({exc}); install it with pip install "
                                   "'mova-export[ros]'") from None
    from ..runtime import MoVARuntime

    asked = _questions(questions, questions_file)
    pacer = Pacer(every, rate_hz)
    prepare_out(out_dir, overwrite)
    open_bag(bag).close()              # a bad bag fails before the bundle loads
    with MoVARuntime.from_bundle(bundle, _options(device, backend, precision, llm_threads, llm_quant,
                                                  trusted_key=trusted_key)) as rt:
        result = replay_bag(rt, bag, image_topic, asked, out_dir, pacer=pacer, max_new_tokens=max_new_tokens,
                            overwrite=overwrite, log=_log)
    summary = result.summary()
    skipped = "; ".join(f"{n} x {why}" for why, n in summary["skipped"].items()) or "none"
    click.echo(f"{summary['frames_read']} frame(s) read, {summary['answered']} answer(s), "
               f"{summary['paced_out']} paced out, skipped: {skipped}")
    if summary["total_ms"]:
        click.echo(f"latency ms: p50 {summary['total_ms']['p50']}, p95 {summary['total_ms']['p95']}, "
                   f"p99 {summary['total_ms']['p99']}")
    click.echo(f"wrote {out_dir / 'answers'} (/mova/answer), {out_dir / 'answers.jsonl'}, {out_dir / 'replay.json'}")
