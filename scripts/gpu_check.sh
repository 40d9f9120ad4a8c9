#!/usr/bin/env bash
# One GPU check of kdrl at the paper config's real shapes (scripts/gpu_check.py says what it measures).
#
#   scripts/gpu_check.sh                    # on the GPU machine: one H100/H200, < 8 min, no network
#   scripts/gpu_check.sh --tiny             # anywhere: tiny models on CPU, seconds
#   scripts/gpu_check.sh --vs-trl           # on the GPU machine: only kdrl's step vs TRL's (1.5B/7B), ~3 min
#   scripts/gpu_check.sh --download-wheels  # HERE, before: the packages the GPU machine lacks → .whl/
#
# The GPU machine has torch and transformers but not pydantic (kdrl.config) or polars
# (kdrl.batching/kdrl.storage, which kdrl.train imports), nor TRL and datasets (--vs-trl).
# --download-wheels fetches them for its Python 3.12 into .whl/ (~57 MiB: add `.whl/` to
# .git/info/exclude and carry it); this script installs them into a temp folder when they are not
# importable. kdrl itself runs from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--download-wheels" ]]; then
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        polars==2.1.0 polars-runtime-32==2.1.0 \
        trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
    exit
fi
# pydantic and polars are needed; TRL and datasets only by --vs-trl (installed when carried)
if ! "$PY" -c "import pydantic, polars" 2>/dev/null \
    || { compgen -G ".whl/trl-*.whl" >/dev/null && ! "$PY" -c "import trl, datasets" 2>/dev/null; }; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: pydantic/polars missing and no .whl/ carried: run scripts/gpu_check.sh --download-wheels first" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kdrl-gpu-check-site .whl/*.whl
    export PYTHONPATH=/tmp/kdrl-gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" scripts/gpu_check.py "$@"
