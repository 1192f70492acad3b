#!/usr/bin/env bash
export TRAINER=KgCoOp
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
