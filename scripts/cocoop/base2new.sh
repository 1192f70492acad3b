#!/usr/bin/env bash
export TRAINER=CoCoOp
export CFG="${CFG:-vit_b16_c4_ep10_batch1_ctxv1}"
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
