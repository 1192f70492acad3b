#!/usr/bin/env bash
export TRAINER=CoOp
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
