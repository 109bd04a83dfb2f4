"""A bundle a robot can trust: signatures (sign -> verify -> run; every change after signing, an unsigned bundle and
the wrong key refused with one line before anything is loaded), containment (`..`, absolute paths and escaping
symlinks refused by name), the limits on what a request can make the runtime do (pixels, question length,
max_new_tokens), and one producer per work unit when builds share a work folder (the second waits and reuses; a
killed build's lock does not block the next)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import cli_error, one_line

from mova_export.bundle import load_bundle, sha256_file
from mova_export.bundle import signing as signing_module
from mova_export.bundle.signing import read_signature, sign_bundle, verify_bundle
from mova_export.cli import main
from mova_export.core.errors import BundleError, RuntimeInputError, SignatureError
from mova_export.core.image_inputs import MAX_IMAGE_PIXELS, load_image
from mova_export.runtime import MoVARuntime
from mova_export.runtime import session as session_module

pytest.importorskip("model_signing")
FAST = {"backend": "onnxruntime", "llm": {"n_threads": 1}, "vision_threads": 1}
QUESTION = "How many cups are on the table?"
ARTIFACTS_ONLY = ("manifest.json", "report.json", "report.md", "build.log", "bundle.sig")


# ---- fixtures --------------------------------------------------------------------------------------------------------
def _write_key(path: Path, key, password: bytes | None = None) -> None:
    from cryptography.hazmat.primitives import serialization

    encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """fleet (P-256), other (P-384), locked (P-256, password "robots"), rsa: PEM private keys and their .pub."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    folder = tmp_path_factory.mktemp("keys")
    _write_key(folder / "fleet.key", ec.generate_private_key(ec.SECP256R1()))
    _write_key(folder / "other.key", ec.generate_private_key(ec.SECP384R1()))
    _write_key(folder / "locked.key", ec.generate_private_key(ec.SECP256R1()), b"robots")
    _write_key(folder / "rsa.key", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    (folder / "password.txt").write_text("robots\n")
    (folder / "wrong.txt").write_text("guess\n")
    return {p.name: p for p in folder.iterdir()}


def _copy(bundle: Path, to: Path) -> Path:
    """A real copy (the build's files are read-only hard links into the work folder), writable."""
    out = Path(shutil.copytree(bundle, to))
    for f in out.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o644)
    return out


@pytest.fixture(scope="module")
def signed(cpu_build, keys, tmp_path_factory) -> Path:
    """The cpu bundle, signed with fleet.key through `mova-export sign`."""
    bundle = _copy(cpu_build.bundle, tmp_path_factory.mktemp("signed") / "bundle")
    result = CliRunner().invoke(main, ["sign", str(bundle), "--key", str(keys["fleet.key"])])
    assert result.exit_code == 0, result.output
    assert "signed" in result.output and (bundle / "bundle.sig").is_file()
    return bundle


@pytest.fixture()
def nothing_loaded(monkeypatch) -> list[str]:
    return watch_loaders(monkeypatch)


def watch_loaders(monkeypatch) -> list[str]:
    """Records every attempt to parse the manifest, create a vision session or open the GGUF (each one fails)."""
    opened: list[str] = []

    def record(what):
        def fake(*args, **kwargs):
            opened.append(what)
            raise AssertionError(f"{what} opened before the signature was checked")
        return fake

    monkeypatch.setattr(session_module, "BundleVision", record("vision graphs"))
    monkeypatch.setattr(session_module, "LlamaCppLLM", record("GGUF"))
    monkeypatch.setattr(signing_module, "load_bundle", record("manifest"))
    return opened


def _flip(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height (a few dozen bytes: what a decompression bomb's header looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


# ---- sign -> verify -> run -------------------------------------------------------------------------------------------
def test_sign_verify_run(signed, keys, cpu_build):
    verified = CliRunner().invoke(main, ["verify", str(signed), "--public-key", str(keys["fleet.pub"])])
    assert verified.exit_code == 0, verified.output
    signature = read_signature(signed)
    assert signature.kind == "key" and signature.signer in verified.output
    on_disk = sorted(p.relative_to(signed).as_posix() for p in signed.rglob("*") if p.is_file())
    assert sorted(signature.files) == [f for f in on_disk if f != "bundle.sig"]   # every file, manifest included
    assert "manifest.json" in signature.files and "build.log" in signature.files
    assert signature.sha256["manifest.json"] == sha256_file(signed / "manifest.json")
    with MoVARuntime.from_bundle(signed, trusted_key=keys["fleet.pub"], **FAST) as rt:
        answer = rt.ask(_coffee(), QUESTION, max_new_tokens=8)
    assert answer.text and answer.routing_text
    ran = CliRunner().invoke(main, ["run", str(signed), "--image", "coffee", "--question", QUESTION, "--json",
                                    "--max-new-tokens", "8", "--llm-threads", "1", "--backend", "onnxruntime",
                                    "--trusted-key", str(keys["fleet.pub"])])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.output.strip().splitlines()[-1])["answer"]


def _coffee():
    from mova_export.source.photos import sample_images

    return sample_images(["coffee"])["coffee"]


def _rewrite_manifest_hash(bundle: Path, rel: str) -> None:
    """What an attacker who edits a graph does next: the manifest's sha256 and size of it rewritten to match."""
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["files"][rel] = {"sha256": sha256_file(bundle / rel), "bytes": (bundle / rel).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(raw, indent=2))


def _graph(bundle: Path) -> str:
    return next(rel for rel in json.loads((bundle / "manifest.json").read_text())["files"] if rel.endswith(".onnx"))


def _gguf(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["llm"]["gguf"]


CHANGES = {
    "graph byte flipped": lambda b: (_flip(b / _graph(b)), _graph(b))[1],
    "graph edited, manifest rewritten to match": lambda b: (_flip(b / _graph(b)), _rewrite_manifest_hash(b, _graph(b)),
                                                           _graph(b))[2],
    "GGUF truncated": lambda b: (os.truncate(b / _gguf(b), 4096), _gguf(b))[1],
    "manifest edited": lambda b: ((b / "manifest.json").write_text(json.dumps(
        {**json.loads((b / "manifest.json").read_text()), "created_utc": "2000-01-01T00:00:00Z"})), "manifest.json")[1],
    "file added": lambda b: ((b / "llm" / "extra.gguf").write_bytes(b"GGUF"), "llm/extra.gguf")[1],
    "file removed": lambda b: ((b / "report.md").unlink(), "report.md")[1],
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_after_signing_is_refused_before_anything_is_opened(signed, keys, tmp_path, nothing_loaded,
                                                                       change):
    bundle = _copy(signed, tmp_path / "bundle")
    rel = CHANGES[change](bundle)
    with pytest.raises(SignatureError) as info:
        MoVARuntime.from_bundle(bundle, trusted_key=keys["fleet.pub"], **FAST)
    message = one_line(info)
    assert rel in message and "after it was signed" in message and "refusing" in message, message
    assert nothing_loaded == []
    result = CliRunner().invoke(main, ["verify", str(bundle), "--trusted-key", str(keys["fleet.pub"])])
    assert rel in cli_error(result)


def test_a_changed_engine_is_refused(cpu_build, keys, tmp_path, monkeypatch):
    """A TensorRT engine (a fake one here: the cpu target has none) is a signed file like any other."""
    bundle = _copy(cpu_build.bundle, tmp_path / "bundle")
    (bundle / "engines").mkdir()
    (bundle / "engines" / "base.int8.engine").write_bytes(os.urandom(4096))
    (bundle / "engines" / "base.int8.engine.json").write_text("{}")
    manifest = load_bundle(bundle, verify=False).manifest
    manifest.engines["base"] = {"engine": "engines/base.int8.engine", "metadata": "engines/base.int8.engine.json",
                                "precision": "int8", "flavor": "tensorrt", "verified": False}
    manifest.write(bundle)
    sign_bundle(bundle, keys["fleet.key"])
    assert verify_bundle(bundle, keys["fleet.pub"]).verified
    _flip(bundle / "engines" / "base.int8.engine")
    opened = watch_loaders(monkeypatch)
    with pytest.raises(SignatureError, match=r"engines/base\.int8\.engine changed"):
        MoVARuntime.from_bundle(bundle, trusted_key=keys["fleet.pub"], **FAST)
    assert opened == []


def test_unsigned_bundle_wrong_key_and_bad_key_files_are_refused(cpu_build, signed, keys, tmp_path, nothing_loaded):
    cases = {
        "not signed": (cpu_build.bundle, keys["fleet.pub"]),
        "signed by another key": (signed, keys["other.pub"]),
        "is a private key": (signed, keys["fleet.key"]),
        "not an elliptic-curve key": (signed, keys["rsa.pub"]),
        "does not exist": (signed, tmp_path / "nope.pub"),
    }
    for expected, (bundle, trusted) in cases.items():
        with pytest.raises(SignatureError) as info:
            MoVARuntime.from_bundle(bundle, trusted_key=trusted, **FAST)
        assert expected in one_line(info), (expected, str(info.value))
    assert nothing_loaded == []
    result = CliRunner().invoke(main, ["run", str(cpu_build.bundle), "--image", "coffee", "--question", QUESTION,
                                       "--trusted-key", str(keys["fleet.pub"])])
    assert "is not signed" in cli_error(result)


def test_a_damaged_signature_file_is_refused(signed, keys, tmp_path):
    sig = (signed / "bundle.sig").read_bytes()
    raw = json.loads(sig)
    envelope = raw["dsseEnvelope"]["signatures"][0]
    import base64

    flipped = bytearray(base64.b64decode(envelope["sig"]))
    flipped[8] ^= 1
    envelope["sig"] = base64.b64encode(bytes(flipped)).decode()
    cases = {"does not verify": json.dumps(raw).encode(), "not a model-signing signature": b"\x00\xff garbage",
             "not a model-signing signature (KeyError": b"{}", "not a model-signing signature (TypeError": b"[]",
             "not a model-signing signature (JSONDecodeError": sig[: len(sig) // 2]}
    for i, (expected, data) in enumerate(cases.items()):
        bundle = _copy(signed, tmp_path / f"b{i}")
        (bundle / "bundle.sig").write_bytes(data)
        with pytest.raises(SignatureError) as info:
            verify_bundle(bundle, keys["fleet.pub"])
        assert expected in one_line(info), (expected, str(info.value))


def test_signing_keys_and_passwords(cpu_build, keys, tmp_path):
    bundle = _copy(cpu_build.bundle, tmp_path / "bundle")
    runner = CliRunner()
    locked = ["sign", str(bundle), "--key", str(keys["locked.key"])]
    assert "wrong password" in cli_error(runner.invoke(main, [*locked, "--key-password-file", str(keys["wrong.txt"])]))
    assert "no terminal" in cli_error(runner.invoke(main, locked))        # CliRunner's stdin is not a terminal
    assert "not an elliptic-curve key" in cli_error(runner.invoke(main, ["sign", str(bundle), "--key",
                                                                         str(keys["rsa.key"])]))
    assert "not a private key" in cli_error(runner.invoke(main, ["sign", str(bundle), "--key",
                                                                 str(keys["fleet.pub"])]))
    assert not (bundle / "bundle.sig").exists()
    ok = runner.invoke(main, [*locked, "--key-password-file", str(keys["password.txt"])])
    assert ok.exit_code == 0, ok.output
    assert verify_bundle(bundle, keys["locked.pub"]).verified
    _flip(bundle / _graph(bundle))           # a bundle that no longer matches its manifest is never signed
    with pytest.raises(BundleError, match="does not match its sha256") as info:
        sign_bundle(bundle, keys["fleet.key"])
    one_line(info)


def _certificate(subject: str, key, issuer=None, issuer_key=None, ca: bool = False):
    """A P-256 certificate for `key`, self-signed (a root CA) or issued by issuer/issuer_key (a code-signing leaf)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    usage = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    usage.update(key_cert_sign=ca, crl_sign=ca, digital_signature=not ca)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1 if ca else 0))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(**usage), critical=True))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def test_a_certificate_chain_signs_and_its_root_verifies(cpu_build, keys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root_key, leaf_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _certificate("fleet root CA", root_key, ca=True)
    pem = {"root.pem": root, "leaf.pem": _certificate("mova builder", leaf_key, root, root_key),
           "other-root.pem": _certificate("another CA", other_key, ca=True)}
    for name, cert in pem.items():
        (tmp_path / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(tmp_path / "leaf.key", leaf_key)
    bundle = _copy(cpu_build.bundle, tmp_path / "bundle")
    result = CliRunner().invoke(main, ["sign", str(bundle), "--key", str(tmp_path / "leaf.key"), "--certificate",
                                       str(tmp_path / "leaf.pem"), "--chain", str(tmp_path / "root.pem")])
    assert result.exit_code == 0 and "CN=mova builder" in result.output, result.output
    assert verify_bundle(bundle, tmp_path / "root.pem").signer == "CN=mova builder"
    with pytest.raises(SignatureError, match="does not chain to the trusted certificate") as info:
        verify_bundle(bundle, tmp_path / "other-root.pem")
    one_line(info)
    with pytest.raises(SignatureError, match="certificate signature.*pass the root CA certificate"):
        verify_bundle(bundle, keys["fleet.pub"])
    _flip(bundle / _graph(bundle))
    with pytest.raises(SignatureError, match="changed after it was signed"):
        verify_bundle(bundle, tmp_path / "root.pem")


def test_inspect_shows_the_signer_and_whether_it_verifies(signed, cpu_build, keys):
    runner = CliRunner()
    plain = json.loads(runner.invoke(main, ["inspect", str(signed), "--json"]).output)["signature"]
    assert plain["signer"].startswith("key sha256:") and plain["verified"] is None and plain["files"] > 10
    good = json.loads(runner.invoke(main, ["inspect", str(signed), "--json", "--trusted-key",
                                           str(keys["fleet.pub"])]).output)["signature"]
    assert good["verified"] is True and good["signer"] == plain["signer"]
    bad = json.loads(runner.invoke(main, ["inspect", str(signed), "--json", "--trusted-key",
                                          str(keys["other.pub"])]).output)["signature"]
    assert bad["verified"] is False and "another key" in bad["problem"]
    text = runner.invoke(main, ["inspect", str(signed), "--trusted-key", str(keys["fleet.pub"])]).output
    assert "signature: signed by key sha256:" in text and "verifies with" in text
    unsigned = runner.invoke(main, ["inspect", str(cpu_build.bundle)]).output
    assert "signature: none" in unsigned


def test_build_sign_key_signs_as_the_last_step(tiny_checkpoint, calib_dir, work_dir, cpu_build, keys, tmp_path):
    out = tmp_path / "signed-build"
    args = ["build", "--target", "cpu", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--calib",
            str(calib_dir), "--work-dir", str(work_dir), "--quiet", "--sign-key", str(keys["locked.key"])]
    refused = CliRunner().invoke(main, [*args, "--sign-key-password-file", str(keys["wrong.txt"])])
    assert "wrong password" in cli_error(refused) and not out.exists()     # refused before anything is built
    result = CliRunner().invoke(main, [*args, "--sign-key-password-file", str(keys["password.txt"])])
    assert result.exit_code == 0, result.output
    signature = verify_bundle(out, keys["locked.pub"])
    assert signature.verified and "build.log" in signature.files and "manifest.json" in signature.files
    assert f"signed {out}" in result.output
    assert not list(tmp_path.glob(".signed-build*"))                        # no temp folder left


# ---- containment ---------------------------------------------------------------------------------------------------
def test_a_dotdot_entry_with_a_matching_hash_is_refused_before_anything_is_read(cpu_build, tmp_path, monkeypatch):
    bundle = _copy(cpu_build.bundle, tmp_path / "bundle")
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the bundle")
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["files"]["../outside.txt"] = {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(raw))
    hashed: list[Path] = []
    from mova_export.bundle import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: hashed.append(Path(p)) or "0" * 64)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert "'../outside.txt' climbs out with '..'" in one_line(info)
    assert hashed == []                                                  # refused before any file was hashed
    for rel in ("/etc/hostname", "graphs/../../outside.txt", "C:\\x.onnx", "graphs\\x.onnx", "llm/a\nb.gguf"):
        raw["files"] = {rel: {"sha256": "0" * 64, "bytes": 1}}
        (bundle / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError) as info:
            load_bundle(bundle, verify=False)                           # refused with or without the sha256 check
        assert "a bundle only names its own files" in one_line(info), rel
    monkeypatch.undo()
    assert "only names its own files" in cli_error(CliRunner().invoke(main, ["inspect", str(bundle), "--no-verify"]))


def test_a_graph_symlinked_out_of_the_bundle_is_refused(cpu_build, tmp_path):
    bundle = _copy(cpu_build.bundle, tmp_path / "bundle")
    rel = _graph(bundle)
    elsewhere = tmp_path / "elsewhere.onnx"
    shutil.copy(bundle / rel, elsewhere)                                # same bytes: the hashes would match
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(elsewhere)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert f"'{rel}' is a symlink" in one_line(info) and "outside the bundle" in str(info.value)
    result = CliRunner().invoke(main, ["run", str(bundle), "--image", "coffee", "--question", QUESTION])
    assert "outside the bundle" in cli_error(result)
    (bundle / rel).unlink()
    (bundle / "graphs" / "real.onnx").write_bytes(elsewhere.read_bytes())
    (bundle / rel).symlink_to("real.onnx")                              # a link that stays inside is no escape
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["files"]["graphs/real.onnx"] = raw["files"][rel]
    (bundle / "manifest.json").write_text(json.dumps(raw))
    assert load_bundle(bundle).manifest.files[rel]


def test_a_signed_bundle_holds_no_symlinks(signed, keys, tmp_path):
    bundle = _copy(signed, tmp_path / "bundle")
    (bundle / "report.md").unlink()
    (bundle / "report.md").symlink_to(bundle / "report.json")
    with pytest.raises(SignatureError, match="'report.md' is a symlink") as info:
        verify_bundle(bundle, keys["fleet.pub"])
    one_line(info)


def test_a_manifest_that_is_a_json_list_is_one_line(cpu_build, tmp_path):
    bundle = _copy(cpu_build.bundle, tmp_path / "bundle")
    (bundle / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="holds a JSON list, not an object") as info:
        load_bundle(bundle)
    one_line(info)
    assert "JSON list" in cli_error(CliRunner().invoke(main, ["inspect", str(bundle)]))


# ---- limits on a request ---------------------------------------------------------------------------------------------
def test_a_decompression_bomb_is_refused_from_its_header(cpu_build, tmp_path):
    bomb = _png_header(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(RuntimeInputError) as info:
        load_image(bomb)
    assert "30000" in one_line(info) or "900.0 megapixels" in str(info.value)
    assert "above the limit of 67.1 megapixels (8192x8192)" in str(info.value)
    assert time.perf_counter() - start < 1
    just_over = _png_header(tmp_path / "big.png", 8193, 8192)
    with pytest.raises(RuntimeInputError, match="8193x8192 = 67.1 megapixels"):
        load_image(just_over)
    assert MAX_IMAGE_PIXELS == 8192 * 8192
    result = CliRunner().invoke(main, ["run", str(cpu_build.bundle), "--image", str(bomb), "--question", QUESTION,
                                       "--llm-threads", "1"])
    assert "megapixels, above the limit" in cli_error(result)


def test_question_and_max_new_tokens_are_checked_against_the_context(cpu_build):
    frame = _coffee()
    with MoVARuntime.from_bundle(cpu_build.bundle, **{**FAST, "llm": {"n_threads": 1, "n_ctx": 1024}}) as rt:
        before = rt.frames.stats()
        with pytest.raises(RuntimeInputError) as info:
            rt.ask(frame, QUESTION * 60, max_new_tokens=8)
        assert "the question is too long for the LLM's context" in one_line(info)
        assert "shorten it by at least" in str(info.value)
        with pytest.raises(RuntimeInputError) as info:
            rt.ask(frame, QUESTION, max_new_tokens=1000)
        message = one_line(info)
        left = int(message.split("ask for at most ")[1].split()[0])
        assert "max_new_tokens=1000 does not fit" in message and 0 < left < 1000
        assert rt.frames.stats() == before                              # refused before any pixel was touched
        answer = rt.ask(frame, QUESTION, max_new_tokens=left)           # exactly what is left fits
        assert answer.text and answer.prompt_tokens + left == 1024
    result = CliRunner().invoke(main, ["run", str(cpu_build.bundle), "--image", "coffee", "--question",
                                       "x " * 5000, "--llm-threads", "1"])
    assert "too long for the LLM's context" in cli_error(result)


# ---- one producer per work unit ----------------------------------------------------------------------------------
_FAKE_STAGE = r'''
import json, sys, time
from pathlib import Path
from mova_export.core.progress import Console
from mova_export.pipeline.unit import BuildContext, run_unit
from mova_export.pipeline.work import WorkFolder

root, log = Path(sys.argv[1]), Path(sys.argv[2])

class Slow:
    name, version = "slow", 1
    def unit_name(self, item): return item
    def settings(self, ctx, item): return {"item": item}
    def upstream(self, ctx, item): return {}
    def bytes_needed(self, ctx, item): return 0
    def produce(self, ctx, item, tmp):
        with log.open("a") as f: f.write(f"produce {item}\n")
        time.sleep(3)
        (tmp / "out.txt").write_text("same bytes")
        return {"made": item}

lines = []
console = Console(quiet=True)
console.line = lines.append
ctx = BuildContext(None, {"digest": "x"}, None, None, WorkFolder(root), console)
print("started", flush=True)
out = run_unit(ctx, Slow(), "unit")
print(json.dumps({"reused": out.reused, "data": out.data, "lines": lines}), flush=True)
'''


def test_two_builds_produce_one_unit_once_the_second_waits_and_reuses(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(_FAKE_STAGE)
    log = tmp_path / "produced.log"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "work"), str(log)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text().splitlines() == ["produce unit"]                # produced once
    assert sorted(r["reused"] for r in results) == [False, True]
    assert all(r["data"] == {"made": "unit"} for r in results)
    waiter = next(r for r in results if r["reused"])
    assert any("another build is producing this unit; waiting" in line for line in waiter["lines"]), waiter


def _work_copy(work_dir: Path, dest: Path, drop: dict[str, set[str]]) -> Path:
    """A hard-linked copy of the session's work folder without the units named in drop ({stage: {name}})."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return sorted(drop.get(Path(folder).name, set()) & set(names))
    return Path(shutil.copytree(work_dir, dest, copy_function=os.link, ignore=ignore))


def _build_cmd(checkpoint: Path, calib: Path, work: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mova_export.cli", "build", "--target", "cpu", "--checkpoint", str(checkpoint),
            "--out", str(out), "--calib", str(calib), "--work-dir", str(work), "--quiet"]


def _lock_held(lock: Path) -> bool:
    from filelock import FileLock, Timeout

    if not lock.exists():
        return False
    probe = FileLock(str(lock))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def test_a_killed_builds_lock_does_not_block_the_next(tiny_checkpoint, calib_dir, work_dir, cpu_build, tmp_path):
    work = _work_copy(work_dir, tmp_path / "work", {"quantize": {"text_encoder"}})
    key = cpu_build.manifest.stages["quantize/text_encoder"]["key"]
    lock = work / ".locks" / f"quantize.text_encoder.{key}.lock"
    first = subprocess.Popen(_build_cmd(tiny_checkpoint, calib_dir, work, tmp_path / "a"), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not _lock_held(lock):
        assert first.poll() is None and time.monotonic() < deadline, "the build never took the unit's lock"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)                                   # kill -9: no cleanup runs
    first.wait()
    assert lock.exists() and not (tmp_path / "a").exists()
    start = time.monotonic()
    second = subprocess.run(_build_cmd(tiny_checkpoint, calib_dir, work, tmp_path / "b"), capture_output=True,
                            text=True, timeout=400)
    assert second.returncode == 0, second.stderr
    assert load_bundle(tmp_path / "b").manifest.stages["quantize/text_encoder"]["status"] == "computed"
    assert "waiting" not in (tmp_path / "b" / "build.log").read_text()
    assert time.monotonic() - start < 400


@pytest.mark.slow
def test_two_builds_at_once_on_one_work_folder_make_identical_runnable_bundles(tiny_checkpoint, calib_dir,
                                                                              work_dir, cpu_build, tmp_path):
    work = _work_copy(work_dir, tmp_path / "work", {"quantize": {"text_encoder"}, "gguf": {"q4_k_m"}})
    outs = [tmp_path / "one", tmp_path / "two"]
    procs = [subprocess.Popen(_build_cmd(tiny_checkpoint, calib_dir, work, out), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for out in outs]
    for p in procs:
        _, err = p.communicate(timeout=500)
        assert p.returncode == 0, err
    stages = [load_bundle(out).manifest.stages for out in outs]           # both verify
    for unit in ("quantize/text_encoder", "gguf/q4_k_m"):                 # each computed once, reused by the other
        assert sorted(s[unit]["status"] for s in stages) == ["computed", "reused"], unit
    files = [{p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*")
              if p.is_file() and p.name not in ARTIFACTS_ONLY} for out in outs]
    assert files[0] == files[1] and any(rel.endswith(".gguf") for rel in files[0])
    tables = [{k: v for k, v in load_bundle(out).manifest.files.items() if k not in ARTIFACTS_ONLY} for out in outs]
    assert tables[0] == tables[1]
    answers = []
    for out in outs:
        with MoVARuntime.from_bundle(out, **FAST) as rt:
            answers.append(rt.ask(_coffee(), QUESTION, max_new_tokens=8).token_ids)
    assert answers[0] == answers[1] and answers[0]
