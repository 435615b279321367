"""`buf breaking` of the keyguard.v1 API against the previous commit (`make lint`, so CI too).

A client generated from yesterday's keyguard.proto must keep working against today's server:
a renumbered field, a removed RPC or a changed type fails here, in the commit that makes it
(buf.yaml's `breaking` rules). The previous commit is HEAD~1 (a merge's first parent: the main
line before it); working-tree changes are compared too, so the check runs before committing.

buf resolves no imports here (no network, no BSR): like `buf lint`, it reads images that protoc
builds with the installed googleapis protos, one from protos/ and one from HEAD~1's protos/
(extracted with `git archive`). Envoy's ext_authz subset is not checked (it follows Envoy, and
moved once), only keyguard/v1.

Skipped, with a message and success, where there is no previous commit to compare with: the
first commit, a shallow clone (`git clone --depth 1`), a tree that is not a git checkout, or a
previous commit without protos/keyguard/v1.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from generate import HERE, lint_image

PREVIOUS = "HEAD~1"
API_DIR = "keyguard/v1"


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True, check=False)


def main(buf: str, image_dir: str) -> int:
    if _git("rev-parse", "-q", "--verify", f"{PREVIOUS}^{{commit}}").returncode != 0:
        print(f"buf breaking: skipped, no {PREVIOUS} here (first commit, shallow clone or no git checkout)")
        return 0
    prefix = _git("rev-parse", "--show-prefix").stdout.decode().strip()  # "protos/"
    if _git("cat-file", "-e", f"{PREVIOUS}:{prefix}{API_DIR}").returncode != 0:
        print(f"buf breaking: skipped, {PREVIOUS} has no {prefix}{API_DIR}")
        return 0
    archive = _git("archive", "--format=tar", PREVIOUS, "--", ".")
    if archive.returncode != 0:
        sys.stderr.write(archive.stderr.decode())
        return 1
    images = Path(image_dir)
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as before:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(before, filter="data")
        if lint_image(str(images / "buf-now.binpb")) or lint_image(str(images / "buf-before.binpb"), Path(before)):
            return 1
    return subprocess.run(
        [
            buf,
            "breaking",
            str(images / "buf-now.binpb"),
            "--against",
            str(images / "buf-before.binpb"),
            "--config",
            "buf.yaml",
            "--path",
            API_DIR,
            "--exclude-imports",
        ],
        cwd=HERE,
        check=False,
    ).returncode


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} BUF IMAGE_DIR")
    sys.exit(main(sys.argv[1], sys.argv[2]))
