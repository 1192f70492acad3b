#!/usr/bin/env bash
export TRAINER=BiMoRS CFG="${CFG:-vit_b16_c4_ep10_batch4_ctxv1}" PROTOCOL_NAME=base2new
# shellcheck source=scripts/bimors/env.sh
source "$(dirname "$0")/env.sh"
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
