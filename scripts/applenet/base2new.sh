#!/usr/bin/env bash
export TRAINER=APPLeNet
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
