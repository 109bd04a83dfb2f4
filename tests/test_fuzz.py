"""Property tests (hypothesis) on every parser of outside input: manifest.json, the bundle verifier (files changed,
added, removed, linked out; the signature), recipe YAML, a checkpoint's config.json and shard index, safetensors
headers, and the image loader. Each input is either accepted or refused with the project's one-line error
(a MoVAExportError), never another exception, a hang or a crash; and a verified bundle is one whose files are the
ones its manifest (and its signature) lists.

Derandomized (the same examples on every run, no example database written) and sized to run in well under two
minutes on 2 shared cores; HYPOTHESIS_PROFILE=long runs many more examples of each."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mova_export.bundle import load_bundle, sha256_file  # noqa: E402
from mova_export.core.errors import BundleError, MoVAExportError, RuntimeInputError, SignatureError  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", parent=settings.get_profile("ci"), derandomize=False, max_examples=2000)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(n: int) -> settings:
    """n examples under the ci profile; the long profile's count otherwise."""
    return settings(max_examples=n) if PROFILE == "ci" else settings()


def one_line_error(exc: BaseException) -> None:
    assert isinstance(exc, MoVAExportError), f"{type(exc).__name__}: {exc}"
    assert str(exc) and "\n" not in str(exc), repr(str(exc))


@contextmanager
def refused_or_accepted() -> Iterator[None]:
    """The property: the block returns, or raises a one-line MoVAExportError; anything else fails the example."""
    try:
        yield
    except MoVAExportError as exc:
        one_line_error(exc)


# ---- structure mutations ---------------------------------------------------------------------------------------------
PATHS = st.sampled_from(["../outside.txt", "/etc/hostname", "graphs/../../x", "graphs/base.fp32.onnx", "", ".",
                         "graphs", "llm/model.f16.gguf", "C:\\x", "a\x00b", "graphs/\n.onnx", "x" * 300])
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | PATHS)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8) | PATHS, inner, max_size=4), max_leaves=10)


def mutate(value: Any, data: st.DataObject, depth: int = 0) -> Any:
    """value with one change at a random place: a subtree replaced, a key removed or added, a list entry dropped."""
    containers = isinstance(value, (dict, list)) and value and depth < 8
    action = data.draw(st.sampled_from(["replace", "descend", "descend", "descend", "remove", "add"])
                       if containers else st.just("replace"))
    if action == "replace":
        return data.draw(JSON)
    if isinstance(value, dict):
        keys = sorted(value)
        key = data.draw(st.sampled_from(keys))
        if action == "remove":
            return {k: v for k, v in value.items() if k != key}
        if action == "add":
            return {**value, data.draw(st.text(max_size=8) | PATHS): data.draw(JSON)}
        return {**value, key: mutate(value[key], data, depth + 1)}
    index = data.draw(st.integers(0, len(value) - 1))
    if action == "remove":
        return value[:index] + value[index + 1:]
    if action == "add":
        return [*value, data.draw(JSON)]
    return [*value[:index], mutate(value[index], data, depth + 1), *value[index + 1:]]


def mutations(template: Any, data: st.DataObject) -> Any:
    value = template
    for _ in range(data.draw(st.integers(1, 3))):
        value = mutate(value, data)
    return value


# ---- a small bundle --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    """A real manifest (the tiny model's facts, one graph per role, an LLM, tokenizers) over small files: what the
    loader and the verifier read, without the minutes a build takes."""
    from mova_export.bundle import GraphEntry, LLMEntry, Manifest, RuntimeDefaults, Variant
    from mova_export.components import facts_from_config
    from mova_export.core.spec import TensorSpec
    from mova_export.synth import synthetic_config

    root = tmp_path_factory.mktemp("small") / "bundle"
    files = {"graphs/base.fp32.onnx": os.urandom(3000), "graphs/adapter_routing.fp32.onnx": os.urandom(2000),
             "llm/model.f16.gguf": b"GGUF" + os.urandom(4000), "tokenizer/llm/tokenizer.json": b"{}",
             "tokenizer/text/vocab.txt": b"[PAD]\n[UNK]\n", "report.md": b"# report\n"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    spec = [TensorSpec("x", (1, 3, 8, 8))]
    graphs = {name: GraphEntry(name, name, role, spec, spec, {"fp32": Variant(f"graphs/{name}.fp32.onnx",
                                                                              [f"graphs/{name}.fp32.onnx"], 3000)})
              for name, role in (("base", "tower"), ("adapter_routing", "adapter_routing"))}
    manifest = Manifest(model=facts_from_config(synthetic_config("tiny")), config={}, graphs=graphs,
                        tokenizers={"llm": {"dir": "tokenizer/llm", "files": ["tokenizer.json"]},
                                    "text": {"dir": "tokenizer/text", "files": ["vocab.txt"]}},
                        source_checkpoint={}, tools={}, created_utc="2026-01-01T00:00:00Z",
                        llm=LLMEntry("llm/model.f16.gguf", "f16", 8, 16),
                        runtime=RuntimeDefaults(precision={"base": "fp32", "adapter_routing": "fp32"}),
                        report={"markdown": "report.md"})
    manifest.write(root)
    load_bundle(root)
    return root


@contextmanager
def copy_of(bundle: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mova-fuzz-") as scratch:
        yield Path(shutil.copytree(bundle, Path(scratch) / "bundle", symlinks=True))


@examples(300)
@given(data=st.data())
def test_manifest_json_mutations_load_or_refuse(small_bundle, data):
    template = json.loads((small_bundle / "manifest.json").read_text())
    raw = mutations(template, data)
    with copy_of(small_bundle) as bundle:
        (bundle / "manifest.json").write_text(json.dumps(raw))
        with refused_or_accepted():
            loaded = load_bundle(bundle)
            for rel in loaded.manifest.files:      # accepted: everything it names is inside and as recorded
                assert (bundle / rel).resolve().is_relative_to(bundle.resolve())


@examples(60)
@given(text=st.binary(max_size=300) | st.text(max_size=300).map(str.encode)
       | st.integers(1, 200_000).map(lambda depth: b"[" * depth))
def test_manifest_json_bytes_load_or_refuse(small_bundle, text):
    with copy_of(small_bundle) as bundle:
        (bundle / "manifest.json").write_bytes(text)
        with pytest.raises(BundleError) as info:
            load_bundle(bundle)
        one_line_error(info.value)


# ---- the verifier: files changed on disk -----------------------------------------------------------------------------
FILE_OPS = st.sampled_from(["flip", "truncate", "append", "delete", "add", "link_out", "link_in", "replace_dir"])


def apply(bundle: Path, op: str, rel: str, data: st.DataObject) -> None:
    """Change one file (rel) of a bundle copy (nothing when an earlier change made it a link, a folder or gone)."""
    path = bundle / rel
    if path.is_symlink() or not path.is_file():
        return
    if op == "flip":
        raw = bytearray(path.read_bytes())
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            path.write_bytes(bytes(raw))
    elif op == "truncate":
        size = path.stat().st_size
        if size:
            os.truncate(path, data.draw(st.integers(0, size - 1)))
    elif op == "append":
        with path.open("ab") as f:
            f.write(data.draw(st.binary(min_size=1, max_size=64)))
    elif op == "delete":
        path.unlink()
    elif op == "add":
        folder = data.draw(st.sampled_from(["graphs", "llm", "engines", "checks", "tokenizer/text"]))
        (bundle / folder).mkdir(parents=True, exist_ok=True)
        (bundle / folder / "added.bin").write_bytes(b"x")
    elif op == "link_out":                      # the same bytes, from outside the bundle
        outside = bundle.parent / f"outside-{path.name}"
        shutil.copy(path, outside)
        path.unlink()
        path.symlink_to(outside)
    elif op == "link_in":                       # a link that stays inside: no escape, same bytes
        twin = path.with_name(f"twin-{path.name}")
        shutil.copy(path, twin)
        path.unlink()
        path.symlink_to(twin.name)
    elif op == "replace_dir":
        path.unlink()
        path.mkdir()


def state(bundle: Path) -> dict[str, str]:
    """What a bundle holds: every entry with its sha256 ("link -> target" for a symlink, "dir" for a folder)."""
    out = {}
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        out[rel] = (f"link -> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else sha256_file(p))
    return out


def must_refuse(bundle: Path, table: dict[str, Any]) -> bool:
    """Whether a verified load must refuse: a listed file not a regular file inside the bundle with its recorded
    sha256, or an artifact the table does not list."""
    for rel, meta in table.items():
        path = bundle / rel
        if not path.resolve().is_relative_to(bundle.resolve()) or not path.is_file():
            return True
        if sha256_file(path) != meta["sha256"]:
            return True
    return any(p.is_file() and p.relative_to(bundle).as_posix() not in table
               for folder in ("graphs", "llm", "engines", "checks", "tokenizer") for p in (bundle / folder).rglob("*"))


@examples(250)
@given(data=st.data())
def test_the_verifier_refuses_every_change_to_a_listed_file(small_bundle, data):
    table = json.loads((small_bundle / "manifest.json").read_text())["files"]
    with copy_of(small_bundle) as bundle:
        for _ in range(data.draw(st.integers(1, 3))):
            apply(bundle, data.draw(FILE_OPS), data.draw(st.sampled_from(sorted(table))), data)
        try:
            load_bundle(bundle)
        except BundleError as exc:
            one_line_error(exc)
        else:
            assert not must_refuse(bundle, table), "a changed bundle verified"


@pytest.fixture(scope="module")
def signed_small(small_bundle, tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mova_export.bundle.signing import sign_bundle

    folder = tmp_path_factory.mktemp("fuzz-keys")
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (folder / "k.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    bundle = Path(shutil.copytree(small_bundle, folder / "bundle"))
    sign_bundle(bundle, folder / "k.pem")
    return bundle, folder / "k.pub"


@examples(150)
@given(data=st.data())
def test_a_signed_bundle_refuses_every_change(signed_small, data):
    from mova_export.bundle.signing import load_trusted_bundle

    signed, public = signed_small
    files = sorted(json.loads((signed / "manifest.json").read_text())["files"]) + ["manifest.json"]
    with copy_of(signed) as bundle:
        for _ in range(data.draw(st.integers(1, 2))):
            apply(bundle, data.draw(FILE_OPS), data.draw(st.sampled_from(files)), data)
        try:
            load_trusted_bundle(bundle, public)
        except SignatureError as exc:    # every change is refused, a link that stays inside too (plain files only)
            one_line_error(exc)
        else:
            assert state(bundle) == state(signed), "a bundle changed after signing verified"


@examples(120)
@given(data=st.data())
def test_signature_file_mutations_are_refused(signed_small, data):
    from mova_export.bundle.signing import load_trusted_bundle

    signed, public = signed_small
    raw = json.loads((signed / "bundle.sig").read_text())
    how = data.draw(st.sampled_from(["json", "bytes", "truncate"]))
    with copy_of(signed) as bundle:
        sig = bundle / "bundle.sig"
        if how == "json":
            sig.write_text(json.dumps(mutations(raw, data)))
        elif how == "bytes":
            sig.write_bytes(data.draw(st.binary(max_size=200)))
        else:
            text = sig.read_bytes()
            sig.write_bytes(text[: data.draw(st.integers(0, len(text) - 1))])
        try:
            load_trusted_bundle(bundle, public)
        except MoVAExportError as exc:
            one_line_error(exc)
        # a mutation that changes nothing the verifier reads (an unknown key added) may still verify


# ---- recipe YAML -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_template() -> Any:
    from mova_export.recipe import resolve_target

    return yaml.safe_load(resolve_target("cpu").read_text())


@examples(400)
@given(data=st.data())
def test_recipe_mutations_parse_or_refuse(recipe_template, data):
    from mova_export.recipe.load import parse_recipe

    with refused_or_accepted():
        parse_recipe(mutations(recipe_template, data), source="fuzz.yaml")


@examples(150)
@given(text=st.text(max_size=400) | st.sampled_from(["a: &a [*a]", "- &x [*x, *x]\n", "{", "name: [", "\t-",
                                                      "a: !!python/object:os.system x", "? [a, b]\n: c"]))
def test_recipe_yaml_text_loads_or_refuses(text):
    from mova_export.recipe import load_recipe

    with tempfile.TemporaryDirectory(prefix="mova-fuzz-yaml-") as scratch:
        path = Path(scratch) / "fuzz.yaml"
        path.write_text(text)
        with refused_or_accepted():
            load_recipe(path)


# ---- a checkpoint's config.json and shard index -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory) -> Path:
    from mova_export.core.progress import NULL
    from mova_export.synth import write_synthetic_checkpoint

    return Path(write_synthetic_checkpoint(tmp_path_factory.mktemp("fuzz-ckpt") / "ckpt", scale="tiny",
                                           console=NULL, shard_size=4 << 20))


@contextmanager
def checkpoint_with(layout: Path, **replaced: bytes) -> Iterator[Path]:
    """A checkpoint folder whose shards link to `layout`'s and whose named files hold the given bytes."""
    with tempfile.TemporaryDirectory(prefix="mova-fuzz-ckpt-") as scratch:
        folder = Path(scratch) / "ckpt"
        folder.mkdir()
        for p in layout.iterdir():
            if p.name not in replaced:
                (folder / p.name).symlink_to(p)
        for name, data in replaced.items():
            (folder / name).write_bytes(data)
        yield folder


@examples(250)
@given(data=st.data())
def test_checkpoint_config_and_index_mutations_open_or_refuse(tiny_layout, data):
    from mova_export.source.checkpoint import Checkpoint

    which = data.draw(st.sampled_from(["config.json", "pytorch_model.bin.index.json"]))
    template = json.loads((tiny_layout / which).read_text())
    with checkpoint_with(tiny_layout, **{which: json.dumps(mutations(template, data)).encode()}) as folder:
        with refused_or_accepted():
            Checkpoint.open(folder)


@examples(40)
@given(which=st.sampled_from(["config.json", "pytorch_model.bin.index.json"]),
       text=st.binary(max_size=200) | st.integers(1, 100_000).map(lambda d: b"{\"a\":" * d))
def test_checkpoint_json_bytes_open_or_refuse(tiny_layout, which, text):
    from mova_export.source.checkpoint import Checkpoint

    with checkpoint_with(tiny_layout, **{which: text}) as folder:
        with pytest.raises(MoVAExportError) as info:
            Checkpoint.open(folder)
        one_line_error(info.value)


# ---- safetensors headers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def safetensors_parts(tiny_layout) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, tensor bytes, config.json) of the package's trained LLM weights as a one-file checkpoint."""
    import mova_export

    raw = (Path(mova_export.__file__).parent / "data" / "tiny_trained_llm.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:], (tiny_layout / "config.json").read_bytes()


def _safetensors(header: Any, payload: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + payload


@examples(250)
@given(data=st.data())
def test_safetensors_header_mutations_read_or_refuse(safetensors_parts, data):
    from mova_export.source.checkpoint import Checkpoint

    header, payload, config = safetensors_parts
    how = data.draw(st.sampled_from(["header", "header", "length", "payload"]))
    if how == "header":
        shard = _safetensors(mutations(header, data), payload)
    elif how == "length":
        shard = _safetensors(header, payload, data.draw(st.integers(0, 2**64 - 1)))
    else:
        shard = _safetensors(header, payload[: data.draw(st.integers(0, len(payload)))])
    with tempfile.TemporaryDirectory(prefix="mova-fuzz-st-") as scratch:
        folder = Path(scratch)
        (folder / "config.json").write_bytes(config)
        (folder / "model.safetensors").write_bytes(shard)
        with refused_or_accepted():
            ckpt = Checkpoint.open(folder, check_owners=False)
            keys = ckpt.keys()[:4]
            ckpt.tensor_info(keys)
            for _ in ckpt.tensors(keys):
                pass


# ---- the image loader ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded_images() -> dict[str, bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        picture.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


@examples(400)
@given(data=st.data())
def test_image_files_load_or_refuse(encoded_images, data):
    from mova_export.core.image_inputs import load_image

    how = data.draw(st.sampled_from(["flip", "truncate", "splice", "random"]))
    raw = bytearray(encoded_images[data.draw(st.sampled_from(sorted(encoded_images)))])
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "splice":                       # a header field (sizes live in the first bytes) set to anything
        at = data.draw(st.integers(0, min(64, len(raw) - 4)))
        raw[at:at + 4] = data.draw(st.binary(min_size=4, max_size=4))
    else:
        raw = bytearray(data.draw(st.binary(max_size=400)))
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(bytes(raw))
        f.flush()
        try:
            rgb = load_image(f.name)
        except RuntimeInputError as exc:
            one_line_error(exc)
        else:
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@examples(150)
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=5),
       dtype=st.sampled_from([np.uint8, np.float32, np.int64, np.bool_, np.uint16]))
def test_image_arrays_load_or_refuse(shape, dtype):
    from mova_export.core.image_inputs import load_image

    try:
        rgb = load_image(np.zeros(shape, dtype))
    except RuntimeInputError as exc:
        one_line_error(exc)
    else:
        assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and rgb.size > 0


def test_the_fuzz_targets_hold_real_data(small_bundle, tiny_layout, encoded_images):
    """The templates the fuzzers mutate are valid inputs (so the mutations start from something real)."""
    from mova_export.core.image_inputs import load_image
    from mova_export.source.checkpoint import Checkpoint

    assert load_bundle(small_bundle).manifest.llm.gguf == "llm/model.f16.gguf"
    assert sha256_file(small_bundle / "report.md")
    assert Checkpoint.open(tiny_layout).keys()
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(encoded_images["PNG"])
        f.flush()
        assert load_image(f.name).shape == (24, 32, 3)
