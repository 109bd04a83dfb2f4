"""An interrupted build leaves no partial bundle and resumes from its finished units: SIGTERM in the middle of the
export stage, then the same command again, gives the files an uninterrupted build gives."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mova_export
from mova_export.core.progress import NULL

REPO = Path(mova_export.__file__).resolve().parents[1]
COMPONENTS = "base,expert_F,expert_D,text_encoder"   # no adapter: no features of every tower, a quick build


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mova_export.synth import write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("resume") / "ckpt", scale="tiny", console=NULL)


def _finished(work: Path, stage: str) -> list[str]:
    return sorted(p.parent.parent.name for p in work.glob(f"{stage}/*/*/unit.json"))


def _default_signals() -> None:
    """Run in the child before exec: SIGINT back to its default disposition. A suite launched from a
    non-interactive shell's background job inherits SIGINT as ignored, and Python then keeps ignoring it, so the
    child would never see the Ctrl-C this test sends (measured: SigIgn bit 2 set in /proc/PID/status)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _build_command(checkpoint: Path, out: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "mova_export.cli", "build", "--target", "cpu", "--checkpoint", str(checkpoint),
            "--out", str(out), "--work-dir", str(work), "--components", COMPONENTS]


def test_sigterm_mid_export_leaves_no_partial_bundle_and_the_rerun_resumes(checkpoint, tmp_path):
    from mova_export.bundle import load_bundle
    from mova_export.pipeline import BuildRequest, build

    work, out = tmp_path / "work", tmp_path / "out" / "bundle-cpu"
    out.parent.mkdir()
    proc = subprocess.Popen(_build_command(checkpoint, out, work), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_signals)
    deadline = time.time() + 600
    while len(_finished(work, "export")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the build ended before it could be interrupted:\n" + proc.stdout.read()
    first_units = _finished(work, "export")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output
    assert "interrupted" in output and "re-run the same command to resume" in output
    assert len(first_units) >= 2
    # no bundle, no partial bundle beside it, no half-written unit in the work folder
    assert list(out.parent.iterdir()) == [], list(out.parent.iterdir())
    assert not [p for p in work.rglob("*") if ".partial-" in p.name]
    assert set(first_units) <= set(_finished(work, "export"))

    resumed = build(BuildRequest(checkpoint=checkpoint, target="cpu", out=out, components=COMPONENTS.split(","),
                                 work_dir=work, quiet=True))
    status = {(r.stage, r.name): r.status for r in resumed.records}
    assert all(status[("export", name)] == "reused" for name in first_units), status
    assert any(s == "computed" for (stage, _), s in status.items() if stage in ("export", "quantize"))
    assert "unit(s) reused from the work folder" in (out / "build.log").read_text()

    # an uninterrupted build from scratch (its own work folder) gives the same files, byte for byte
    fresh = build(BuildRequest(checkpoint=checkpoint, target="cpu", out=tmp_path / "fresh",
                               components=COMPONENTS.split(","), work_dir=tmp_path / "work-fresh", quiet=True))
    assert all(r.status == "computed" for r in fresh.records)
    shipped = {rel: meta["sha256"] for rel, meta in load_bundle(out).manifest.files.items()
               if not rel.startswith("report.")}
    reference = {rel: meta["sha256"] for rel, meta in fresh.manifest.files.items() if not rel.startswith("report.")}
    assert shipped == reference


def test_progress_shows_the_component_and_a_bar_early(checkpoint, tmp_path):
    """Piped (no terminal), every step is a plain line: the first unit's name and a step count show within
    seconds of the start, and the same lines land in the bundle's build.log."""
    out, work = tmp_path / "b", tmp_path / "work"
    proc = subprocess.Popen(_build_command(checkpoint, out, work), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_signals)
    start, first = time.time(), None
    for line in proc.stdout:
        if "features base:" in line and "/" in line.split("features base:")[1]:
            first = time.time() - start
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    assert first is not None and first < 30, first      # well within 30 s of the start, even on a loaded machine
    assert proc.returncode == 130


def test_clean_removes_the_work_folder(checkpoint, tmp_path):
    from click.testing import CliRunner

    from mova_export.cli import main

    work = tmp_path / "work"
    (work / "export" / "base" / "0123.partial-999999").mkdir(parents=True)   # a killed build's leftover
    (work / "export" / "base" / "4567").mkdir()
    (work / "export" / "base" / "4567" / "unit.json").write_text(json.dumps({}))
    result = CliRunner().invoke(main, ["clean", "--work-dir", str(work), "--partials"])
    assert result.exit_code == 0 and "removed 1 folder" in result.output
    assert (work / "export" / "base" / "4567").exists() and not (work / "export" / "base" / "0123.partial-999999").exists()
    result = CliRunner().invoke(main, ["clean", "--work-dir", str(work)])
    assert result.exit_code == 0 and not work.exists()
