#!/usr/bin/env bash
export TRAINER=CoCoOp
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
