"""`mova-export replay BAG`: a recorded ROS 2 bag through MoVA, offline, as the robot would have seen it.

Reads MCAP and sqlite3 bags with rosbags (pure Python; no ROS install), decodes the image topic (Image in rgb8,
bgr8, rgba8, bgra8, mono8; CompressedImage jpeg/png; anything else is skipped with a count and its reason), paces
it (`--every N` or `--rate HZ` by header stamps), and answers every standing question about each admitted frame
through robot.loop.RobotLoop, the code the ROS 2 node runs. Replay answers every admitted frame (the `queue`
policy, one at a time), so the same bag gives the same answers, equal to `ask` on the same decoded frames.

Writes into OUT: `answers/`, a bag (the input's storage format) with std_msgs/String JSON on /mova/answer, each at
its source frame's receive time plus the answer's latency; `answers.jsonl` (one payload a line); `replay.json`
(counts, latency percentiles); `latency.png` where matplotlib is installed. Everything is written in a temporary
folder first and moved into OUT at the end: a failure leaves no half-written output.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import BagError, RuntimeInputError
from .loop import Pacer, RobotLoop
from .messages import ANSWER_TOPIC, IMAGE_TYPES, STRING_TYPE, Frame

OUTPUTS = ("answers", "answers.jsonl", "replay.json", "latency.png")


@dataclass
class ReplayResult:
    out: Path
    frames: int = 0                         # image messages read
    rows: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        totals = [r["timings_ms"]["total"] for r in self.rows]
        pct = {f"p{q}": round(float(np.percentile(totals, q)), 1) for q in (50, 95, 99)} if totals else {}
        return {"frames_read": self.frames, **self.counts, "total_ms": pct, "outputs": list(OUTPUTS)}


def open_bag(bag: Path) -> Any:
    """An opened rosbags AnyReader; BagError with one line for a missing, truncated or foreign file or folder."""
    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.typesys import Stores, get_typestore

    bag = Path(bag)
    if not bag.exists():
        raise BagError(f"bag {bag} does not exist; pass a rosbag2 folder (metadata.yaml + .mcap/.db3) or the file")
    for typestore in (None, get_typestore(Stores.ROS2_HUMBLE)):   # old bags carry no message definitions
        try:
            reader = AnyReader([bag], default_typestore=typestore)
            reader.open()
            return reader
        except AnyReaderError as exc:
            if typestore is None and "no type definitions" in str(exc):
                continue
            raise BagError(f"{bag} is not a readable ROS 2 bag ({_first_line(exc)}); if its recorder was killed "
                           "mid-write, repair it with `mcap recover` (MCAP) or `ros2 bag reindex`") from None
        except (FileNotFoundError, OSError, ValueError, KeyError) as exc:
            raise BagError(f"{bag} is not a ROS 2 bag ({_first_line(exc)}); pass a rosbag2 folder with "
                           "metadata.yaml, or its .mcap / .db3 file") from None
    raise BagError(f"{bag}: no message definitions in the bag")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _storage(bag: Path) -> str:
    files = [bag] if bag.is_file() else list(bag.iterdir())
    return "sqlite3" if any(f.suffix == ".db3" for f in files) else "mcap"


def prepare_out(out: Path, overwrite: bool) -> None:
    """OUT may exist; replay's own outputs there are replaced only with overwrite (nothing else is touched)."""
    if out.exists() and not out.is_dir():
        raise RuntimeInputError(f"--out {out} is a file; pass a folder")
    there = [name for name in OUTPUTS if (out / name).exists()]
    if there and not overwrite:
        raise RuntimeInputError(f"{out} already holds a replay ({', '.join(there)}); pass --overwrite to replace "
                                "it or choose another --out folder")


def replay_bag(runtime: Any, bag: Path, image_topic: str, questions: Sequence[str], out: Path, *,  # noqa: PLR0913 (the command's options)
               pacer: Pacer | None = None, max_new_tokens: int = 64, overwrite: bool = False,
               log: Callable[[str], None] = lambda line: None) -> ReplayResult:
    """Replay `image_topic` of `bag` through the runtime; see the module docstring. Raises BagError /
    RuntimeInputError with one line (nothing written) for a bad bag, topic, question or output folder."""
    questions = [q.strip() for q in questions if q and q.strip()]
    if not questions:
        raise RuntimeInputError("no question; pass --question Q (repeatable) or --questions-file F")
    bag, out = Path(bag), Path(out)
    prepare_out(out, overwrite)
    result = ReplayResult(out)
    reader = open_bag(bag)
    try:
        connections = [c for c in reader.connections if c.topic == image_topic]
        if not connections:
            images = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})
            raise BagError(f"{bag} has no topic {image_topic!r}; its image topics: {', '.join(images) or 'none'}")
        wrong = [c.msgtype for c in connections if c.msgtype not in IMAGE_TYPES]
        if wrong:
            raise BagError(f"topic {image_topic} carries {wrong[0]}, not an image; MoVA reads "
                           f"{' and '.join(IMAGE_TYPES)}")
        total = sum(c.msgcount for c in connections)
        with tempfile.TemporaryDirectory(prefix=".replay-", dir=out.parent if out.parent.exists() else None) as tmp:
            staged = Path(tmp)
            _replay_messages(reader, connections, total, runtime, questions, pacer, max_new_tokens, staged,
                             _storage(bag), result, log)
            _write_reports(result, staged)
            out.mkdir(parents=True, exist_ok=True)
            for name in OUTPUTS:
                if (staged / name).exists():
                    target = out / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
                    shutil.move(str(staged / name), str(target))
    finally:
        reader.close()
    return result


def _replay_messages(reader: Any, connections: list, total: int, runtime: Any, questions: Sequence[str],  # noqa: PLR0913 (one replay's state)
                     pacer: Pacer | None, max_new_tokens: int, staged: Path, storage: str, result: ReplayResult,
                     log: Callable[[str], None]) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(Stores.ROS2_HUMBLE)
    string = typestore.types[STRING_TYPE]
    plugin = StoragePlugin.SQLITE3 if storage == "sqlite3" else StoragePlugin.MCAP

    with Writer(staged / "answers", version=9, storage_plugin=plugin) as writer, \
            (staged / "answers.jsonl").open("w") as lines:
        channel = writer.add_connection(ANSWER_TOPIC, STRING_TYPE, typestore=typestore)

        pending: list[tuple[str, int]] = []   # the worker thread answers; sqlite3 writes only from this thread

        def publish(payload: str, frame: Frame, answer: Any) -> None:
            pending.append((payload, frame.received_ns + int(round(answer.timings_ms["total"], 3) * 1e6)))

        def flush() -> None:
            while pending:
                payload, at = pending.pop(0)
                writer.write(channel, at, typestore.serialize_cdr(string(data=payload), STRING_TYPE))
                lines.write(payload + "\n")
                result.rows.append(json.loads(payload))

        loop = RobotLoop(runtime, questions, publish, pacer=pacer, policy="queue", max_new_tokens=max_new_tokens,
                         image_topic=connections[0].topic)
        try:
            for connection, t_ns, raw in reader.messages(connections=connections):
                result.frames += 1
                futures = loop.on_image(reader.deserialize(raw, connection.msgtype), connection.msgtype, t_ns)
                if futures:
                    for f in futures:
                        f.result()
                    flush()
                    log(f"frame {result.frames}/{total}: {len(futures)} answer(s), "
                        f"{futures[-1].result().timings_ms['total']:.0f} ms")
        except Exception as exc:  # rosbags' AnyReaderError, apsw.CorruptError (a truncated sqlite3 bag), ...
            if isinstance(exc, (RuntimeInputError, BagError)):
                raise
            raise BagError(f"{connections[0].topic}: the bag is truncated or corrupt after {result.frames} "
                           f"message(s) ({_first_line(exc)}); nothing was written") from None
    result.counts = loop.counts()


def _write_reports(result: ReplayResult, staged: Path) -> None:
    """replay.json, and latency.png (answer latency over the bag's time) where matplotlib is installed."""
    (staged / "replay.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:          # the device install has no plotting library: the JSON lines hold the numbers
        return
    if not result.rows:
        return
    t0 = min(r["stamp"]["sec"] + r["stamp"]["nanosec"] / 1e9 for r in result.rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    for question in dict.fromkeys(r["question"] for r in result.rows):
        rows = [r for r in result.rows if r["question"] == question]
        x = [r["stamp"]["sec"] + r["stamp"]["nanosec"] / 1e9 - t0 for r in rows]
        ax.plot(x, [r["timings_ms"]["total"] for r in rows], "o-", ms=3, label=f"total: {question[:40]}")
        ax.plot(x, [r["timings_ms"]["time_to_first_token"] for r in rows], ".:", label=f"TTFT: {question[:40]}")
    ax.set(xlabel="frame stamp (s from the first answered frame)", ylabel="ms", title="MoVA answer latency over the bag")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(staged / "latency.png", dpi=100)
    plt.close(fig)
