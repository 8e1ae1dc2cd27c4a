#!/usr/bin/env bash
# Wheels for what the GPU image lacks (see ../shared/notes/gpu-h200.md), for Python 3.12 manylinux x86_64,
# into .whl/ (ignored by git; the device tool carries it with `carry: [".whl"]`). Run on a machine that
# reaches PyPI; benchmarks/gpu_check.sh installs them offline with --no-index --no-deps.
#
#   bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
DEST=.whl
rm -rf "$DEST" && mkdir -p "$DEST"
# pure-Python wheels (py3-none-any) and binary ones for CPython 3.12; versions as in this project's CPU venv
WHEELS=(hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        webdataset==1.0.2 braceexpand==0.1.7 wfdb==4.3.1 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
        albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16
        msgpack==1.2.4 py-cpuinfo==9.0.0 einops==0.8.2)
PLATFORMS=()
for n in 2_28 2_27 2_24 2_17 2_5; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for wheel in "${WHEELS[@]}"; do
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DEST" "$wheel"
done
# DeepSpeed publishes no wheel: build a py3-none-any one from its sdist (its ops JIT-compile on first use;
# the project's torch AdamW needs none)
DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DEST"
ls -1 "$DEST"
du -sh "$DEST"
