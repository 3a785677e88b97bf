#!/usr/bin/env python3
"""Regenerate the Python protobuf/gRPC modules under ``protocol/`` and ``kernel/``.

The inputs are every ``protocol/*.proto`` and ``kernel/model_config.proto``
(the model configuration schema, which the kernel uses without depending on
``protocol/``). For each, this writes, next to the .proto file:

* ``<name>_pb2.py`` and ``<name>_pb2.pyi`` (messages; ``grpc_tools.protoc``)
* ``<name>_grpc.py`` (grpclib client stub and server base class), for the
  files that define a service (``grpc_service.proto``, ``health.proto``).

protoc runs from the repository root with ``-I .`` and the inputs named as
``protocol/<name>.proto`` / ``kernel/model_config.proto``;
``grpc_service.proto`` imports ``kernel/model_config.proto``. The generated
code therefore imports its siblings as ``from kernel import model_config_pb2``
/ ``import protocol.grpc_service_pb2``, which works when the project root is on
``sys.path`` (the project imports these modules as ``protocol.*`` and
``kernel.*``).

The output is what protoc and the grpclib plugin produce, with one rewrite,
the same in both directories: the ``_pb2`` modules register their descriptors
in ``kernel._pool.POOL`` instead of protobuf's default pool, so that they can
be imported in the same process as ``tritonclient`` or ``grpclib.health``,
which register the same fully-qualified names (one pool for all of them, since
``grpc_service.proto`` imports ``model_config.proto``). Stale generated files
are removed first so that a deleted .proto leaves nothing behind. Run it again
after editing any .proto file:

    python scripts/gen_protos.py            # from anywhere; uses this Python
    python scripts/gen_protos.py --check    # exit 1 if the checked-in files
                                            # differ from a fresh generation

Requires grpcio-tools and grpclib in the running interpreter's environment.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The .proto inputs, as globs relative to the repository root; each output goes next to its input.
PROTO_GLOBS = ("protocol/*.proto", "kernel/model_config.proto")
#: The module every generated _pb2 module takes its descriptor pool from.
POOL_MODULE = "kernel._pool"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_grpc.py")
PLUGIN_NAME = "protoc-gen-grpclib_python"
SERVICE_RE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)


def find_grpclib_plugin() -> str:
    """Locate grpclib's protoc plugin, preferring this interpreter's bin dir."""
    bin_dir = Path(sys.executable).parent
    for candidate in (bin_dir / PLUGIN_NAME, bin_dir / f"{PLUGIN_NAME}.exe"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(PLUGIN_NAME)
    if found is None:
        sys.exit(
            f"error: {PLUGIN_NAME} not found (is grpclib installed in this environment?)"
        )
    return found


def proto_files() -> list[str]:
    files = sorted(
        {p.relative_to(REPO_ROOT).as_posix() for g in PROTO_GLOBS for p in REPO_ROOT.glob(g)}
    )
    if not files:
        sys.exit(f"error: no .proto files match {', '.join(PROTO_GLOBS)} in {REPO_ROOT}")
    return files


def proto_dirs() -> list[str]:
    """The directories (relative to the repository root) that hold generated modules."""
    return sorted({g.rsplit("/", 1)[0] for g in PROTO_GLOBS})


def defines_service(proto: str) -> bool:
    return (
        SERVICE_RE.search((REPO_ROOT / proto).read_text(encoding="utf-8")) is not None
    )


def run_protoc(args: list[str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", *args],
        cwd=REPO_ROOT,
        check=True,
    )


def generate(out_root: Path) -> list[Path]:
    """Run protoc for all inputs; return generated paths relative to out_root."""
    protos = proto_files()
    run_protoc([f"--python_out={out_root}", f"--pyi_out={out_root}", *protos])
    service_protos = [p for p in protos if defines_service(p)]
    if service_protos:
        run_protoc(
            [
                f"--plugin={PLUGIN_NAME}={find_grpclib_plugin()}",
                f"--grpclib_python_out={out_root}",
                *service_protos,
            ]
        )
    files = generated_files(out_root)
    for rel in files:
        if rel.name.endswith("_pb2.py"):
            use_private_pool(out_root / rel)
    return files


DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
BUILDER_IMPORT = "from google.protobuf.internal import builder as _builder\n"


def use_private_pool(path: Path) -> None:
    """Make a generated _pb2 module register in kernel._pool.POOL."""
    text = path.read_text(encoding="utf-8")
    if DEFAULT_POOL not in text or BUILDER_IMPORT not in text:
        sys.exit(f"error: unexpected protoc output in {path.name}")
    text = text.replace(DEFAULT_POOL, "_POOL.AddSerializedFile(")
    text = text.replace(BUILDER_IMPORT, BUILDER_IMPORT + f"from {POOL_MODULE} import POOL as _POOL\n", 1)
    path.write_text(text, encoding="utf-8")


def generated_files(root: Path) -> list[Path]:
    """Files under root/protocol and root/kernel that this script generates (or generated before).

    Only names derived from a ``<stem>.proto`` input in the same directory now,
    or files carrying a protoc/grpclib "Generated by" header, count; anything
    else in those directories is left alone.
    """
    found = []
    for rel_dir in proto_dirs():
        stems = {Path(p).stem for p in proto_files() if Path(p).parent.as_posix() == rel_dir}
        directory = root / rel_dir
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if not path.is_file():
                continue
            stem = next(
                (path.name[: -len(s)] for s in GENERATED_SUFFIXES if path.name.endswith(s)),
                None,
            )
            if stem is None:
                continue
            with path.open("rb") as fh:
                head = fh.read(300)
            if stem in stems or b"Generated by the" in head:
                found.append(path.relative_to(root))
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the generated files are missing or out of date",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        for rel_dir in proto_dirs():
            (tmp_root / rel_dir).mkdir(parents=True)
        fresh = generate(tmp_root)

        if args.check:
            current = generated_files(REPO_ROOT)
            stale = [str(p) for p in sorted(set(fresh) ^ set(current))]
            stale += [
                str(p)
                for p in fresh
                if p in current
                and not filecmp.cmp(tmp_root / p, REPO_ROOT / p, shallow=False)
            ]
            if stale:
                print("out of date: " + ", ".join(sorted(set(stale))), file=sys.stderr)
                return 1
            print("generated protobuf modules are up to date")
            return 0

        for old in generated_files(REPO_ROOT):
            (REPO_ROOT / old).unlink()
        for rel in fresh:
            shutil.copyfile(tmp_root / rel, REPO_ROOT / rel)
            print(f"wrote {rel.as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
