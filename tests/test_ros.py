"""ROS 2 data through MoVA without ROS: real bags and CDR messages written by rosbags (MCAP and sqlite3), decoded by
mova_export.robot (the functions the ROS 2 node runs), replayed by `mova-export replay` against the tiny trained
cpu bundle."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import RUNTIME_EXACT
from PIL import Image as PILImage

from mova_export.core.errors import BagError, RuntimeInputError
from mova_export.robot import Pacer, RobotLoop, Skipped, frame_from_message
from mova_export.robot.messages import COMPRESSED_TYPE, IMAGE_TYPE
from mova_export.robot.replay import replay_bag
from mova_export.source.photos import sample_images

rosbags = pytest.importorskip("rosbags")
from rosbags.highlevel import AnyReader  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

TS = get_typestore(Stores.ROS2_HUMBLE)
QUESTION = "What animal is this?"
READABLE = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "rgb8-padded", "jpeg", "png")
SKIPPED = ("16UC1", "bayer_rggb8")


@pytest.fixture(scope="module")
def pixels():
    """A 40x48 RGB crop of the cat photo, and the same shifted per message so every frame differs."""
    return np.ascontiguousarray(sample_images(["chelsea"])["chelsea"][100:140, 150:198])


def _header(t_ns: int, frame_id: str = "cam_optical"):
    return TS.types["std_msgs/msg/Header"](stamp=TS.types["builtin_interfaces/msg/Time"](
        sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id=frame_id)


def _image(kind: str, rgb: np.ndarray, t_ns: int):
    """(msgtype, message) of one encoding of `rgb`."""
    image, compressed = TS.types[IMAGE_TYPE], TS.types[COMPRESSED_TYPE]
    h, w = rgb.shape[:2]
    if kind in ("jpeg", "png"):
        buf = io.BytesIO()
        PILImage.fromarray(rgb).save(buf, format=kind.upper())
        return COMPRESSED_TYPE, compressed(header=_header(t_ns), format=kind,
                                           data=np.frombuffer(buf.getvalue(), np.uint8))
    arrays = {"rgb8": rgb, "bgr8": rgb[:, :, ::-1], "rgba8": np.dstack([rgb, np.full((h, w), 9, np.uint8)]),
              "bgra8": np.dstack([rgb[:, :, ::-1], np.full((h, w), 9, np.uint8)]),
              "mono8": rgb[:, :, 1], "16UC1": rgb[:, :, 0].astype("<u2") * 200, "bayer_rggb8": rgb[:, :, 0],
              "rgb8-padded": np.concatenate([rgb.reshape(h, -1), np.full((h, 5), 7, np.uint8)], axis=1)}
    data = np.ascontiguousarray(arrays[kind]).reshape(h, -1).view(np.uint8)
    encoding = kind.replace("-padded", "")
    return IMAGE_TYPE, image(header=_header(t_ns), height=h, width=w, encoding=encoding, is_bigendian=0,
                             step=data.shape[1], data=data.reshape(-1))


def _expected(kind: str, rgb: np.ndarray) -> np.ndarray:
    if kind == "mono8":
        return np.repeat(rgb[:, :, 1:2], 3, axis=2)
    if kind == "jpeg":
        buf = io.BytesIO()
        PILImage.fromarray(rgb).save(buf, format="JPEG")
        return np.asarray(PILImage.open(buf).convert("RGB"))
    return rgb


def write_bag(path: Path, storage: str, pixels: np.ndarray, kinds=READABLE + SKIPPED, topic="/camera/image"):
    """A real rosbag2 bag: one message per kind on `topic` (mixed Image/CompressedImage connections), stamps 0.1 s
    apart; returns [(kind, stamp_ns, rgb)]."""
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    sent = []
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        channels = {}
        for i, kind in enumerate(kinds):
            rgb = np.ascontiguousarray(np.roll(pixels, 3 * i, axis=1))
            t_ns = 1_700_000_000 * 10**9 + i * 100_000_000
            msgtype, msg = _image(kind, rgb, t_ns)
            if msgtype not in channels:
                channels[msgtype] = writer.add_connection(topic, msgtype, typestore=TS)
            writer.write(channels[msgtype], t_ns + 5_000_000, TS.serialize_cdr(msg, msgtype))
            sent.append((kind, t_ns, rgb))
    return sent


def _messages(bag: Path):
    with AnyReader([bag]) as reader:
        return [(c.msgtype, reader.deserialize(raw, c.msgtype), t) for c, t, raw in reader.messages()]


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_every_supported_encoding_decodes_from_a_real_bag(tmp_path, pixels, storage):
    sent = write_bag(tmp_path / "bag", storage, pixels)
    got = _messages(tmp_path / "bag")
    assert len(got) == len(sent)
    for (kind, t_ns, rgb), (msgtype, msg, _) in zip(sent, got):
        if kind in SKIPPED:
            with pytest.raises(Skipped, match=f"encoding '{kind}' is not a color or gray image"):
                frame_from_message(msg, msgtype)
            continue
        frame = frame_from_message(msg, msgtype)
        assert frame.rgb.dtype == np.uint8 and frame.rgb.shape == rgb.shape, kind
        assert np.array_equal(frame.rgb, _expected(kind, rgb)), kind
        assert frame.stamp_ns == t_ns and frame.frame_id == "cam_optical"


def test_broken_messages_are_skipped_with_a_reason(pixels):
    _, short = _image("rgb8", pixels, 0)
    short.data = short.data[:-10]
    with pytest.raises(Skipped, match=r"rgb8 image 48x40 with step 144 does not fit its 5750 data bytes"):
        frame_from_message(short, IMAGE_TYPE)
    _, garbage = _image("jpeg", pixels, 0)
    garbage.data = np.frombuffer(b"not a jpeg at all", np.uint8)
    with pytest.raises(Skipped, match=r"compressed image \(jpeg\) does not decode: UnidentifiedImageError"):
        frame_from_message(garbage, COMPRESSED_TYPE)
    with pytest.raises(Skipped, match="std_msgs/msg/String is not an image message"):
        frame_from_message(garbage, "std_msgs/msg/String")


def test_pacer_every_and_rate():
    every = Pacer(every=3)
    assert [every.admit(i) for i in range(7)] == [True, False, False, True, False, False, True]
    rate = Pacer(rate_hz=2.0)        # at most one frame per 0.5 s of stamps
    stamps = [int(x * 1e9) for x in (0.0, 0.1, 0.49, 0.5, 0.7, 1.2, 1.21)]
    assert [rate.admit(t) for t in stamps] == [True, False, False, True, False, True, False]
    with pytest.raises(RuntimeInputError, match="pass --every N or --rate HZ, not both"):
        Pacer(every=2, rate_hz=1.0)
    with pytest.raises(RuntimeInputError, match=r"every=0; pass a whole number >= 1"):
        Pacer(every=0)


@pytest.fixture(scope="module")
def rt(parity_bundle):
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT) as runtime:
        yield runtime


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_replay_answers_like_ask_and_keeps_the_stamps(tmp_path, pixels, rt, storage):
    bag = tmp_path / "bag"
    sent = write_bag(bag, storage, pixels)
    result = replay_bag(rt, bag, "/camera/image", [QUESTION], tmp_path / "out", max_new_tokens=12)
    readable = [(k, t, rgb) for k, t, rgb in sent if k not in SKIPPED]
    assert result.frames == len(sent) and result.counts["answered"] == len(readable)
    assert sum(result.counts["skipped"].values()) == len(SKIPPED)
    assert any("'16UC1'" in why for why in result.counts["skipped"])
    lines = [json.loads(x) for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert lines == result.rows and len(lines) == len(readable)
    for (kind, t_ns, rgb), row in zip(readable, lines):
        want = rt.ask(_expected(kind, rgb), QUESTION, 12)
        assert (row["answer"], row["experts"]) == (want.text, want.experts), kind
        assert row["stamp"] == {"sec": t_ns // 10**9, "nanosec": t_ns % 10**9} and row["frame_id"] == "cam_optical"
        assert row["question"] == QUESTION and row["image_topic"] == "/camera/image"
    out_bag = _messages(tmp_path / "out" / "answers")
    assert all(msgtype == "std_msgs/msg/String" for msgtype, _, _ in out_bag)
    # each answer sits at its frame's receive time plus its latency (the bag is in that order)
    want_at = sorted((t_ns + 5_000_000 + int(row["timings_ms"]["total"] * 1e6), json.dumps(row, sort_keys=True))
                     for (_, t_ns, _), row in zip(readable, lines))
    assert [(at, m.data) for _, m, at in out_bag] == want_at
    summary = json.loads((tmp_path / "out" / "replay.json").read_text())
    assert summary["answered"] == len(readable) and summary["total_ms"]["p50"] > 0
    assert (tmp_path / "out" / "latency.png").stat().st_size > 5000
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert any(p.suffix == suffix for p in (tmp_path / "out" / "answers").iterdir())


def test_robot_loop_keeps_only_the_newest_frame_waiting(tmp_path, pixels, rt):
    sent = write_bag(tmp_path / "bag", "mcap", pixels, kinds=("rgb8",) * 6)
    published = []
    loop = RobotLoop(rt, [QUESTION], lambda payload, frame, answer: published.append(json.loads(payload)),
                     max_new_tokens=8, image_topic="/camera/image")
    assert loop.on_question("What is ahead?") is None and loop.errors["question before any frame"] == 1
    busy = rt.ask_stream(pixels, QUESTION, 8)
    next(busy)                                      # MoVA is busy: the camera keeps sending
    futures = [f for msgtype, msg, t in _messages(tmp_path / "bag") for f in loop.on_image(msg, msgtype, t)]
    one_shot = loop.on_question("What is ahead?")
    busy.close()
    futures[-1].result(timeout=120)
    one_shot.result(timeout=120)
    assert [f.cancelled() for f in futures] == [True] * 5 + [False]
    assert loop.dropped == 5 and loop.answered == 2
    newest = sent[-1][1]
    assert {(p["question"], p["stamp"]["nanosec"]) for p in published} == {
        (QUESTION, newest % 10**9), ("What is ahead?", newest % 10**9)}


def _replay_cli(*args):
    from mova_export.cli import main

    return CliRunner().invoke(main, ["replay", *map(str, args)])


def test_replay_command_end_to_end_and_its_errors(tmp_path, pixels, parity_bundle):
    bag = tmp_path / "bag"
    write_bag(bag, "mcap", pixels, kinds=("rgb8", "jpeg", "16UC1"))
    out = tmp_path / "out"
    ok = _replay_cli(bag, "--bundle", parity_bundle, "--image-topic", "/camera/image", "--question", QUESTION,
                     "--out", out, "--max-new-tokens", "6")
    assert ok.exit_code == 0, ok.output
    assert "3 frame(s) read, 2 answer(s), 0 paced out, skipped: 1 x encoding '16UC1'" in ok.output
    again = _replay_cli(bag, "--bundle", parity_bundle, "--image-topic", "/camera/image", "--question", QUESTION,
                        "--out", out)
    assert again.exit_code == 2 and f"error: {out} already holds a replay (answers, answers.jsonl, replay.json, " \
        "latency.png); pass --overwrite" in again.output
    (tmp_path / "notabag").mkdir()
    (tmp_path / "notabag" / "x.txt").write_text("hello")
    mcap = next(bag.glob("*.mcap"))
    truncated = tmp_path / "truncated.mcap"
    truncated.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    cases = [
        ((tmp_path / "nope", "/camera/image"), "bag {} does not exist; pass a rosbag2 folder"),
        ((tmp_path / "notabag", "/camera/image"), "{} is not a ROS 2 bag (Expected metadata file"),
        ((truncated, "/camera/image"), "{} is not a readable ROS 2 bag (File end magic is invalid.)"),
        ((bag, "/camera/depth"), "{} has no topic '/camera/depth'; its image topics: /camera/image"),
    ]
    for (path, topic), message in cases:
        res = _replay_cli(path, "--bundle", parity_bundle, "--image-topic", topic, "--question", QUESTION,
                          "--out", tmp_path / "o2")
        assert res.exit_code == 2 and res.output.startswith("error: " + message.format(path)), res.output
        assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()


def test_a_sqlite_bag_truncated_mid_file_fails_in_one_line_and_writes_nothing(tmp_path, pixels, rt):
    bag = tmp_path / "bag"
    write_bag(bag, "sqlite3", pixels, kinds=("rgb8",) * 40)
    db = next(bag.glob("*.db3"))
    db.write_bytes(db.read_bytes()[: int(db.stat().st_size * 0.9)])
    with pytest.raises(BagError, match=r"(truncated or corrupt after \d+ message|not a readable ROS 2 bag)"):
        replay_bag(rt, bag, "/camera/image", [QUESTION], tmp_path / "out", max_new_tokens=2)
    assert not (tmp_path / "out").exists()
