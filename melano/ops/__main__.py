"""`python -m melano.ops build [--verbose] [--require-cuda]`: build the fused op's library into its cache
(melano.infra.kernels) and print what was built as one JSON line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from melano.infra import kernels
from melano.infra.cli import setup_logging

log = logging.getLogger("melano.ops")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melano.ops", description=(
        "Build the fused InstanceNorm+activation extension into its cache and print what was built "
        "as one JSON line. Environment: MELANO_BUILD_DIR (cache root, default ~/.cache/melano), "
        "CUDA_HOME (CUDA toolkit; default: found from nvcc on PATH), TORCH_CUDA_ARCH_LIST, "
        "MELANO_CUDA_BUILD=no (CPU only)."))
    parser.add_argument("command", choices=["build"], help="build: compile (or find cached) and load")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    parser.add_argument("--require-cuda", action="store_true",
                        help="exit 1 unless the CUDA kernels were built too (for GPU machines)")
    args = parser.parse_args(argv)
    setup_logging()
    info = kernels.build(verbose=args.verbose)
    backend = {"cpu": "ext" if info.ok else "eager", "cuda": "ext" if info.ok and info.cuda else "eager"}
    print(json.dumps({**dataclasses.asdict(info), "backend": backend}))
    if not info.ok:
        log.error("build failed: %s", info.error)
        return 1
    log.info("ready: %s in %.1f s (%s); CUDA kernels: %s", info.library, info.seconds,
             "cached" if info.cached else "compiled", info.cuda_reason if info.cuda else f"no ({info.cuda_reason})")
    if args.require_cuda and not info.cuda:
        log.error("--require-cuda: the CUDA kernels were not built: %s", info.cuda_reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
