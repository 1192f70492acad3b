#!/usr/bin/env bash
export TRAINER=APPLeNet
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
