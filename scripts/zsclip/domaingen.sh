#!/usr/bin/env bash
export TRAINER=ZeroshotCLIP EVAL_ONLY=1
export CFG="${CFG:-vit_b16}"
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
