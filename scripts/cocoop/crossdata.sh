#!/usr/bin/env bash
export TRAINER=CoCoOp
exec bash "$(dirname "$0")/../protocols/crossdata.sh" "$@"
