#!/usr/bin/env bash
export TRAINER=APPLeNet
export CFG="${CFG:-vit_b16_c4}"
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
