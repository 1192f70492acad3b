#!/usr/bin/env bash
# Few-shot learning: train on all classes of DATASET with K shots per class for every K in SHOTS.
#
# Usage: TRAINER=T CFG=C scripts/protocols/fewshot.sh DATASET [SEEDS...] [-- KEY VALUE ...]
#   DATASET    name of a file in configs/datasets/
#   SHOTS      shot counts, space-separated (default: "1 2 4 8 16")
#   SEEDS      default 1 2 3
#   KEY VALUE  config options appended to every train.py command
# Per seed and K:
#   train      $OUTPUT/fewshot/train/DATASET/shots_K/TRAINER/CFG/seedS  (Dassl tests it on all classes)
# then prints the table (python -m tools.results).
# Example: DATA=/data TRAINER=CoOp CFG=vit_b16_ep50_ctxv1 scripts/protocols/fewshot.sh patternnet
set -euo pipefail
PROTOCOL=fewshot
# shellcheck source=scripts/protocols/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

protocol_main "$@"
