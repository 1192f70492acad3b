#!/usr/bin/env bash
export TRAINER=ZeroshotCLIP
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
