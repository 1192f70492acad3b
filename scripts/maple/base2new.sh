#!/usr/bin/env bash
export TRAINER=MaPLe
export CFG="${CFG:-vit_b16_c2_ep5_batch4_2ctx}"
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
