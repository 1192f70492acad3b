#!/usr/bin/env bash
export TRAINER=KgCoOp
export CFG="${CFG:-vit_b16_ep100_ctxv1}"
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
