#!/usr/bin/env bash
export TRAINER=ZeroshotCLIP
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
