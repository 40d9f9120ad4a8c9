#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup.sh" --with-vllm | tail -n 1)"
cd "$root"
export HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
exec "$py" -m pytest -q --timeout=900 "$@"
