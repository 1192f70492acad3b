#!/usr/bin/env bash
export TRAINER=MaPLe
exec bash "$(dirname "$0")/../protocols/crossdata.sh" "$@"
