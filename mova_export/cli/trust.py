"""`mova-export sign` and `mova-export verify`: thin click commands over bundle/signing.py (torch-free)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .common import one_line_errors

KEY_PASSWORD_HELP = "A file holding the signing key's password (else it is asked for when the key is encrypted)."


def key_password(key: Path, password_file: Path | None) -> bytes | None:
    """The signing key's password: from --key-password-file, else asked on the terminal when the key is encrypted."""
    from ..bundle.signing import is_encrypted
    from ..core.errors import SignatureError

    if password_file is not None:
        if not password_file.is_file():
            raise SignatureError(f"password file {password_file} does not exist; pass the file holding the key's "
                                 "password")
        return password_file.read_bytes().rstrip(b"\r\n")
    if not is_encrypted(key):
        return None
    if not sys.stdin.isatty():
        raise SignatureError(f"signing key {key} is encrypted and there is no terminal to ask for its password; pass "
                             "--key-password-file FILE")
    return click.prompt(f"password for {key}", hide_input=True).encode()


@click.command("sign")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", type=click.Path(path_type=Path), required=True,
              help="The signer's private key (PEM, elliptic curve P-256/P-384/P-521).")
@click.option("--key-password-file", type=click.Path(path_type=Path), default=None, help=KEY_PASSWORD_HELP)
@click.option("--certificate", type=click.Path(path_type=Path), default=None,
              help="Sign with a certificate chain: the leaf certificate of --key (PEM).")
@click.option("--chain", "chain", multiple=True, type=click.Path(path_type=Path),
              help="With --certificate: a CA certificate above the leaf (repeat; the root last).")
@one_line_errors
def sign(bundle: Path, key: Path, key_password_file: Path | None, certificate: Path | None,
         chain: tuple[Path, ...]) -> None:
    """Sign every file of a bundle (manifest, graphs, GGUF, engines) into BUNDLE/bundle.sig (OpenSSF model signing,
    offline). Robots then run it with `--trusted-key PUBLIC.pem`; sign again after `mova-export compile`."""
    from ..bundle.signing import sign_bundle

    signature = sign_bundle(bundle, key, password=key_password(key, key_password_file), certificate=certificate,
                            chain=chain)
    click.echo(f"signed {bundle} ({len(signature.files)} files) by {signature.signer}: {signature.path}")
    click.echo(f"check it anywhere with `mova-export verify {bundle} --trusted-key PUBLIC.pem`; robots run it with "
               "`--trusted-key PUBLIC.pem`")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--trusted-key", "--public-key", "trusted", type=click.Path(path_type=Path), required=True,
              help="The signer's PEM public key, or the root CA certificate of a certificate-signed bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print the signature's facts as JSON.")
@one_line_errors
def verify(bundle: Path, trusted: Path, as_json: bool) -> None:
    """Check a bundle's signature and every file against it (and against its manifest); exit 2 with one line naming
    the file or the key when anything differs."""
    from ..bundle.signing import load_trusted_bundle

    loaded, signature = load_trusted_bundle(bundle, trusted)
    if as_json:
        click.echo(json.dumps({"bundle": str(loaded.path), **signature.to_json(),
                               "target": (loaded.manifest.target or {}).get("recipe")}))
        return
    click.echo(f"{bundle}: signed by {signature.signer}, verified with {trusted}; {len(signature.files)} files "
               "unchanged since signing, manifest checked")
