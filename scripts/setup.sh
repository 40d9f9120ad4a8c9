#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtualenv with torch and kdrl installed.
# - Inside an active virtualenv/conda env (VIRTUAL_ENV or CONDA_PREFIX set) that env is used as is,
#   so GPU users keep their own CUDA torch. Otherwise ./.venv is created.
# - torch==2.13.0 (a CPU wheel on these machines) is installed only when no torch imports.
# - Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
# Prints the python to use on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

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
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  "$py" -m pip install -q --upgrade pip >&2
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no torch found: installing torch==2.13.0" >&2
    "$py" -m pip install -q "torch==2.13.0" >&2
  fi
  echo "[setup] installing kdrl and its dependencies" >&2
  "$py" -m pip install -q -e ".[dev]" >&2
  echo "$want" > "$stamp"
fi
echo "$py"
