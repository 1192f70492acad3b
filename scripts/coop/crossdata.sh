#!/usr/bin/env bash
export TRAINER=CoOp
export CFG="${CFG:-vit_b16_ep50_ctxv1}"
exec bash "$(dirname "$0")/../protocols/crossdata.sh" "$@"
