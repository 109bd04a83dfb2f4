"""Signed bundles: OpenSSF model signing (the `model-signing` library) over every file of a bundle, offline.

    mova-export sign BUNDLE --key fleet.key               -> BUNDLE/bundle.sig
    mova-export verify BUNDLE --trusted-key fleet.pub     -> who signed it; a changed, added or removed file refused
    MoVARuntime.from_bundle(B, trusted_key="fleet.pub")   -> the same check before any graph, engine or GGUF is opened

The manifest's sha256 table catches corruption, but whoever can edit a graph can rewrite manifest.json too; a
signature made with a key the robot trusts cannot be rewritten. `bundle.sig` is a Sigstore bundle (a DSSE-signed
in-toto statement listing every file's sha256: graphs, GGUF, engines, tokenizers, report, build.log and
manifest.json; only the signature itself is left out). Signers: an elliptic-curve key pair (P-256, P-384 or P-521),
or a certificate chain (the leaf's key and certificate plus the CA certificates above it), both offline. The trusted
file given to verify is a PEM public key, or the root CA certificate for certificate-signed bundles.

No torch, no numpy: model-signing (the `sign` extra) and cryptography are imported when a signature is made, read or
checked.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..core.errors import BundleError, SignatureError
from .files import sha256_file
from .manifest import MANIFEST, SIGNATURE, Bundle, load_bundle

SIGN_EXTRA = "install the signing extra: pip install 'mova-export[sign]'"
CURVES = ("secp256r1", "secp384r1", "secp521r1")          # what model-signing's elliptic-key signer accepts
MAX_SIGNATURE_BYTES = 64 << 20                            # a signature lists one digest per file: far below this
_SYMLINK = re.compile(r"Cannot use '([^']*)' because it is a symlink")


@dataclass(frozen=True)
class Signature:
    """What a bundle's signature says: who signed it and the digest of every file it covers."""
    path: Path                              # the signature file
    kind: str                               # "key" (an EC key pair) | "certificate" (a certificate chain)
    signer: str                             # "key sha256:<16 hex>" or the leaf certificate's subject
    key_sha256: str | None                  # sha256 of the signer's public key (PEM), for kind "key"
    files: dict[str, str] = field(default_factory=dict)   # bundle-relative path -> digest
    hash_type: str = "sha256"
    verified: bool | None = None            # True: checked with `trusted`; None: read, not checked
    trusted: str | None = None

    @property
    def sha256(self) -> dict[str, str]:
        """The signed sha256 of every file (empty when the signature used another hash)."""
        return dict(self.files) if self.hash_type == "sha256" else {}

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path.name, "kind": self.kind, "signer": self.signer, "key_sha256": self.key_sha256,
                "files": len(self.files), "hash_type": self.hash_type, "verified": self.verified,
                "trusted": self.trusted}


# ---- keys ----------------------------------------------------------------------------------------------------------
def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        import cryptography  # noqa: F401  (model-signing's dependency: the keys are read with it)
    except ImportError:
        raise SignatureError(f"reading a {what} needs the cryptography library; {SIGN_EXTRA}") from None
    path = Path(path)
    if not path.is_file():
        raise SignatureError(f"{what} file {path} does not exist; pass the PEM file of the {what}")
    data = path.read_bytes()[: 1 << 20]
    if b"-----BEGIN " not in data:
        raise SignatureError(f"{what} file {path} is not a PEM file (no -----BEGIN line); pass the {what} in PEM "
                             "form")
    return data


def _check_curve(key: Any, path: str | Path, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        raise SignatureError(f"{what} {path} is not an elliptic-curve key ({type(key).__name__.lstrip('_')}); "
                             "bundles are signed with an EC key: make one with `openssl ecparam -name prime256v1 -genkey -noout -out "
                             "fleet.key` (P-256; P-384 and P-521 work too)")
    if key.curve.name not in CURVES:
        raise SignatureError(f"{what} {path} uses the curve {key.curve.name}; use P-256, P-384 or P-521 "
                             "(`openssl ecparam -name prime256v1 -genkey -noout -out fleet.key`)")


def public_key_sha256(key: Any) -> str:
    """sha256 of a public key's PEM (SubjectPublicKeyInfo): the hint model-signing records in a key signature."""
    from cryptography.hazmat.primitives import serialization

    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def is_encrypted(key_path: str | Path) -> bool:
    """Whether a PEM private key needs a password."""
    data = _read_pem(key_path, "signing key")
    return b"ENCRYPTED" in data


def check_signing_key(key_path: str | Path, password: bytes | None = None) -> str:
    """Load the private key as the signer will (RSA, Ed25519, a wrong password, a public key: SignatureError naming
    the fix); returns its public key's sha256. Run before a build so a bad key fails in a second, not at the end."""
    from cryptography.hazmat.primitives import serialization

    data = _read_pem(key_path, "signing key")
    if b"PRIVATE KEY" not in data:
        raise SignatureError(f"signing key {key_path} is not a private key (a public key or a certificate?); sign with "
                             "the private key, give robots the public one")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        if password is None:
            raise SignatureError(f"signing key {key_path} is encrypted; give its password (--key-password-file, or "
                                 "type it when asked)") from None
        raise SignatureError(f"signing key {key_path} is not encrypted; drop the password") from None
    except ValueError as exc:
        if password is not None and "password" in str(exc).lower():
            raise SignatureError(f"wrong password for signing key {key_path}; give the key's own password") from None
        raise SignatureError(f"signing key {key_path} cannot be read ({str(exc).splitlines()[0][:120]}); pass an EC "
                             "private key in PEM form") from None
    _check_curve(key, key_path, "signing key")
    return public_key_sha256(key.public_key())


def _trusted_kind(trusted: str | Path) -> tuple[str, str | None]:
    """("key", its sha256) for a PEM public key, ("certificate", None) for a CA certificate; SignatureError else."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    data = _read_pem(trusted, "trusted key")
    if b"PRIVATE KEY" in data:
        raise SignatureError(f"trusted key {trusted} is a private key; pass the public key (`openssl ec -in "
                             "fleet.key -pubout -out fleet.pub`): the private key never goes to a robot")
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise SignatureError(f"trusted certificate {trusted} cannot be read ({str(exc)[:120]}); pass the root "
                                 "CA certificate in PEM form") from None
        return "certificate", None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"trusted key {trusted} is not a PEM public key ({str(exc).splitlines()[0][:120]}); pass "
                             "the signer's public key (`openssl ec -in fleet.key -pubout -out fleet.pub`)") from None
    _check_curve(key, trusted, "trusted key")
    return "key", public_key_sha256(key)


def _model_signing() -> Any:
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as exc:   # the library, or pyOpenSSL that it imports without declaring it
        raise SignatureError(f"signed bundles need the model-signing library ({exc}); {SIGN_EXTRA}") from None
    return hashing, signing, verifying


def _hashing_config(hashing: Any) -> Any:
    """Every file but the signature itself, git files included (a bundle has none; an added one must show)."""
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


# ---- sign ----------------------------------------------------------------------------------------------------------
def sign_bundle(bundle_dir: str | Path, key: str | Path, *, password: bytes | None = None,  # noqa: PLR0913 (signers)
                certificate: str | Path | None = None, chain: Sequence[str | Path] = (),
                verify: bool = True) -> Signature:
    """Sign every file of a bundle into BUNDLE/bundle.sig (replaced atomically). With `certificate` the signature
    carries that leaf certificate and `chain` (the CA certificates above it, root last); else the EC key alone.
    verify: check the bundle's files against its manifest first (a tampered bundle is never signed); the build,
    which has just hashed them, passes False."""
    root = Path(bundle_dir)
    if verify:
        load_bundle(root)
    elif not (root / MANIFEST).is_file():
        raise BundleError(f"{root} has no {MANIFEST}; sign a bundle that `mova-export build` wrote")
    if certificate is not None and password is not None:
        raise SignatureError("certificate signing takes an unencrypted leaf key (model-signing has no password for "
                             "it); decrypt it with `openssl ec -in leaf.key -out leaf-plain.key`")
    check_signing_key(key, password)
    if certificate is not None and not chain:
        raise SignatureError("certificate signing needs the CA certificate(s) above the leaf: pass --chain CA.pem "
                             "(the root for a two-level chain)")
    hashing, signing, _ = _model_signing()
    config = signing.Config().set_hashing_config(_hashing_config(hashing))
    if certificate is None:
        config = config.use_elliptic_key_signer(private_key=str(key), password=password)
    else:
        for pem in (certificate, *chain):
            _read_pem(pem, "certificate")
        config = config.use_certificate_signer(private_key=str(key), signing_certificate=str(certificate),
                                               certificate_chain=[str(c) for c in chain])
    with tempfile.TemporaryDirectory(prefix="mova-sign-") as scratch:
        made = Path(scratch) / SIGNATURE
        try:
            config.sign(root, made)
        except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError, TypeError, AttributeError, ...
            raise SignatureError(f"cannot sign bundle {root}: {_explain(exc, root)}") from None
        tmp = root / f".{SIGNATURE}.tmp-{os.getpid()}"
        try:
            tmp.write_bytes(made.read_bytes())
            os.replace(tmp, root / SIGNATURE)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SignatureError(f"cannot write {root / SIGNATURE} ({exc.strerror or exc}); sign a copy of the bundle "
                                 "in a folder you can write to") from None
    return read_signature(root)


# ---- read and verify -----------------------------------------------------------------------------------------------
def read_signature(bundle_dir: str | Path) -> Signature | None:
    """The bundle's signature as it claims to be, not checked (None when the bundle is unsigned); SignatureError when
    bundle.sig is not a model-signing signature."""
    root = Path(bundle_dir)
    path = root / SIGNATURE
    if not path.exists() and not path.is_symlink():
        return None
    bad = f"{path} is not a model-signing signature"
    if path.is_symlink() or not path.is_file():
        raise SignatureError(f"{bad} (a link or a folder); sign the bundle again with `mova-export sign`")
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{bad} ({path.stat().st_size} bytes); sign the bundle again with `mova-export sign`")
    try:
        raw = json.loads(path.read_bytes())
        material = raw["verificationMaterial"]
        statement = json.loads(base64.b64decode(raw["dsseEnvelope"]["payload"], validate=True))
        predicate = statement["predicate"]
        files = {str(r["name"]): str(r["digest"]) for r in predicate["resources"]}
        hash_type = str(predicate["serialization"].get("hash_type", "sha256"))
        if "publicKey" in material:
            hint = str(material["publicKey"]["hint"])
            kind, signer, key_sha256 = "key", f"key sha256:{hint[:16]}", hint
        else:
            kind, key_sha256 = "certificate", None
            signer = _certificate_subject(material["x509CertificateChain"]["certificates"][0]["rawBytes"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, binascii.Error,
            OSError) as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise SignatureError(f"{bad} ({type(exc).__name__}: {detail}); sign the bundle again with "
                             "`mova-export sign`") from None
    return Signature(path, kind, signer, key_sha256, files, hash_type)


def _certificate_subject(raw_b64: str) -> str:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(base64.b64decode(raw_b64, validate=True))
    return cert.subject.rfc4514_string() or "certificate (no subject)"


def verify_bundle(bundle_dir: str | Path, trusted: str | Path) -> Signature:
    """Check bundle.sig against `trusted` (a PEM public key, or the root CA certificate) and every file of the
    bundle against it. Refuses (SignatureError, one line naming the file or the key) an unsigned bundle, a signature
    by another key, a file changed, added or removed after signing, a symlink, an altered signature. Reads the
    files only to hash them: nothing is parsed or loaded."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist; pass the folder `mova-export build` wrote")
    kind, key_sha256 = _trusted_kind(trusted)
    claimed = read_signature(root)
    if claimed is None:
        raise SignatureError(f"bundle {root} is not signed (no {SIGNATURE}) and a trusted key was given: refusing it; "
                             f"sign it on the build box with `mova-export sign {root} --key KEY`")
    if claimed.kind != kind:
        wanted = "root CA certificate" if claimed.kind == "certificate" else "public key"
        raise SignatureError(f"bundle {root} is signed by {claimed.signer} ({claimed.kind} signature), but {trusted} "
                             f"is a {'public key' if kind == 'key' else 'certificate'}; pass the {wanted} of its "
                             "signer")
    if kind == "key" and claimed.key_sha256 != key_sha256:
        raise SignatureError(f"bundle {root} was signed by another key ({claimed.signer}), not by {trusted} (key "
                             f"sha256:{str(key_sha256)[:16]}): refusing it; pass the public key of its signer")
    hashing, _, verifying = _model_signing()
    config = verifying.Config().set_hashing_config(_hashing_config(hashing))
    if kind == "key":
        config = config.use_elliptic_key_verifier(public_key=str(trusted))
    else:
        config = config.use_certificate_verifier(certificate_chain=[str(trusted)])
    try:
        config.verify(root, root / SIGNATURE)
    except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError, InvalidSignature, X509 errors, ...
        raise SignatureError(f"bundle {root}: {_explain(exc, root, claimed)}") from None
    _check_coverage(root, claimed.files)
    return Signature(claimed.path, claimed.kind, claimed.signer, claimed.key_sha256, claimed.files,
                     claimed.hash_type, True, str(trusted))


def _check_coverage(root: Path, signed: Mapping[str, str]) -> None:
    """Every file in the bundle but the signature is one the signature lists (the library checked their bytes)."""
    extra = sorted(set(_present(root)) - set(signed))
    if extra:
        raise SignatureError(f"bundle {root}: {_names(extra)} not covered by its signature (added after signing): "
                             "refusing it; get the bundle again from its source")


def _present(root: Path) -> list[str]:
    """Every file (and link) in the bundle but the signature, bundle-relative."""
    present = []
    for folder, dirs, names in os.walk(root):
        for name in [*names, *(d for d in dirs if Path(folder, d).is_symlink())]:
            rel = Path(folder, name).relative_to(root).as_posix()
            if rel != SIGNATURE:
                present.append(rel)
    return present


def _differences(root: Path, claimed: Signature) -> list[str]:
    """What differs from the signature's file list: files changed, added, removed (named from the files themselves,
    not from the library's message)."""
    present = set(_present(root))
    changed = [rel for rel in sorted(present & set(claimed.files)) if (root / rel).is_file()
               and claimed.hash_type == "sha256" and sha256_file(root / rel) != claimed.files[rel]]
    parts = []
    for what, files in (("changed", changed), ("added", sorted(present - set(claimed.files))),
                        ("removed", sorted(set(claimed.files) - present))):
        if files:
            parts.append(f"{_names(files)} {what}")
    return parts


def load_trusted_bundle(path: str | Path, trusted: str | Path) -> tuple[Bundle, Signature]:
    """The signature first (verify_bundle), then the manifest and its file table, whose sha256 are the signed ones
    (not hashed a second time). What MoVARuntime.from_bundle does with a trusted_key."""
    signature = verify_bundle(path, trusted)
    return load_bundle(path, verify=True, hashed=signature.sha256), signature


# ---- messages ------------------------------------------------------------------------------------------------------
def _names(items: Iterable[str], most: int = 3) -> str:
    items = [str(i).strip() for i in items if str(i).strip()]
    shown = ", ".join(repr(i)[1:-1] for i in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _explain(exc: BaseException, root: Path, claimed: Signature | None = None) -> str:
    """One line for what model-signing raised (its errors are of many types; the messages carry the facts)."""
    text = str(exc)
    name = type(exc).__name__
    again = "get the bundle again from its source (or re-sign it, if the change is yours)"
    if text.startswith("Signature mismatch") or "Hash mismatch" in text:
        parts = _differences(root, claimed) if claimed is not None else []
        detail = "; ".join(parts) or text.splitlines()[0][:160]
        return f"changed after it was signed ({detail}): refusing it; {again}"
    if text.startswith("Key mismatch"):
        return "signed by another key than the trusted one: refusing it; pass the public key of its signer"
    symlink = _SYMLINK.search(text)
    if symlink:
        rel = Path(symlink.group(1))
        shown = rel.relative_to(root).as_posix() if rel.is_relative_to(root) else rel.as_posix()
        return (f"{shown!r} is a symlink; a signed bundle holds plain files only: replace the link with the file it "
                "points to (or remove it)")
    if name == "InvalidSignature":
        return f"the signature in {SIGNATURE} does not verify (the signature file was altered): refusing it; {again}"
    if name == "X509StoreContextError":
        return (f"its signing certificate does not chain to the trusted certificate ({text[:120]}): refusing it; "
                "pass the root CA certificate of its signer")
    detail = text.splitlines()[0][:160] if text else ""
    return f"{name}: {detail}".rstrip(": ") + "; sign the bundle again with `mova-export sign`"
