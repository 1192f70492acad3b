#!/usr/bin/env bash
export TRAINER=MaPLe
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
