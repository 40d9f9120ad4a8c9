#!/usr/bin/env bash
# Set up (if needed) and run the embedded default: a tiny teacher and student on the built-in
# arithmetic task, printing held-out accuracy before and after training.
# Extra arguments go to `kdrl train`, e.g. `scripts/run.sh --set run.steps=20`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup.sh" | tail -n 1)"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
exec "$py" -m flows.cli train "$@"
