#!/usr/bin/env bash
export TRAINER=CLIP_Adapter
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
