#!/usr/bin/env bash
export TRAINER=MaPLe
export CFG="${CFG:-vit_b16_c2_ep5_batch4_2ctx_cross_datasets}"
exec bash "$(dirname "$0")/../protocols/crossdata.sh" "$@"
