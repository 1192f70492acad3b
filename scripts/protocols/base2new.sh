#!/usr/bin/env bash
# Base-to-new generalisation: train on the base half of DATASET's classes, test on base and on new ones.
#
# Usage: scripts/<trainer>/base2new.sh DATASET [SEEDS...] [-- KEY VALUE ...]
#   DATASET    name of a file in configs/datasets/ (patternnet, rsicd, resisc45, mlrsnet, ..., toyrs)
#   SEEDS      default 1 2 3
#   KEY VALUE  config options appended to every train.py command (e.g. -- OPTIM.MAX_EPOCH 5)
# The wrapper sets TRAINER (TRAINER=... [CFG=...] scripts/protocols/base2new.sh works too).
# Per seed, with K = SHOTS (default 16):
#   train on base  $OUTPUT/base2new/train_base/DATASET/shots_K/TRAINER/CFG/seedS  (Dassl tests it on base)
#   test on new    $OUTPUT/base2new/test_new/DATASET/shots_K/TRAINER/CFG/seedS   (--eval-only, last epoch)
# then prints DATASET's Base/New/HM table (python -m tools.results).
# Example: DATA=/data scripts/coop/base2new.sh patternnet 1 2 3
#          scripts/coop/base2new.sh toyrs 1 -- OPTIM.MAX_EPOCH 1   (offline smoke run; add BACKBONE=toy)
set -euo pipefail
PROTOCOL=base2new
# shellcheck source=scripts/protocols/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

protocol_main "$@"
