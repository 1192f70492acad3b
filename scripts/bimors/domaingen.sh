#!/usr/bin/env bash
export TRAINER=BiMoRS
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
