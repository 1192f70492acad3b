#!/usr/bin/env bash
# Single-source domain generalisation: train on all 16 classes of SOURCE, evaluate on the same 16 classes
# in every dataset of TARGETS.
#
# Usage: scripts/<trainer>/domaingen.sh [SEEDS...] [-- KEY VALUE ...]
#   SOURCE     training dataset, a file name in configs/datasets/ (default: patternnetv2)
#   TARGETS    evaluation datasets, space-separated (default: "rsicdv2 resisc45v2 mlrsnetv2")
#   SEEDS      default 1 2 3
#   KEY VALUE  config options appended to every train.py command
# Per seed, with K = SHOTS (default 16):
#   train      $OUTPUT/domaingen/train/SOURCE/shots_K/TRAINER/CFG/seedS  (Dassl tests it on SOURCE)
#   evaluate   $OUTPUT/domaingen/test/TARGET/shots_K/TRAINER/CFG/seedS   (--eval-only, last epoch)
# then prints the transfer table (python -m tools.results). Target folders do not name the source:
# use another OUTPUT when changing SOURCE.
# Example: DATA=/data scripts/cocoop/domaingen.sh 1 2 3
set -euo pipefail
PROTOCOL=domaingen
# shellcheck source=scripts/protocols/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

protocol_main "$@"
