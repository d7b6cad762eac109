#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a lent GPU machine, downloaded HERE (the GPU machine has no network).
#
# Its image (Python 3.12, torch+CUDA, accelerate, peft, pyarrow, tokenizers, ...) lacks deepspeed, datasets
# and faiss, and holds an older transformers; this puts exactly our versions of those into .whl/ (ignored
# by git), which the device call carries and gpu_check.sh installs with --no-index. About 50 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
# shellcheck disable=SC1091
source .venv/bin/activate
version() { python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

rm -rf .whl && mkdir .whl
specs=()
for name in transformers datasets dill multiprocess hjson pydantic pydantic-core annotated-types \
    typing-inspection regex faiss-cpu; do
    specs+=("$name==$(version "$name")")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
# DeepSpeed ships only an sdist: build its pure-Python wheel (ops are JIT-compiled on the GPU if used).
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
ls -1 .whl
du -sh .whl
