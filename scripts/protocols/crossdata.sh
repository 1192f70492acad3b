#!/usr/bin/env bash
# Cross-dataset transfer: train on all classes of SOURCE, evaluate the model on every dataset of TARGETS.
#
# Usage: scripts/<trainer>/crossdata.sh [SEEDS...] [-- KEY VALUE ...]
#   SOURCE     training dataset, a file name in configs/datasets/ (default: patternnet)
#   TARGETS    evaluation datasets, space-separated (default: "rsicd resisc45 mlrsnet")
#   SEEDS      default 1 2 3
#   KEY VALUE  config options appended to every train.py command
# Per seed, with K = SHOTS (default 16):
#   train      $OUTPUT/crossdata/train/SOURCE/shots_K/TRAINER/CFG/seedS  (Dassl tests it on SOURCE)
#   evaluate   $OUTPUT/crossdata/test/TARGET/shots_K/TRAINER/CFG/seedS   (--eval-only, last epoch)
# then prints the transfer table (python -m tools.results). Target folders do not name the source:
# use another OUTPUT when changing SOURCE.
# Example: DATA=/data scripts/maple/crossdata.sh
#          SOURCE=toyrs TARGETS=toyrs BACKBONE=toy scripts/coop/crossdata.sh 1 -- OPTIM.MAX_EPOCH 1
set -euo pipefail
PROTOCOL=crossdata
# shellcheck source=scripts/protocols/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

protocol_main "$@"
