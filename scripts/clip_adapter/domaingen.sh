#!/usr/bin/env bash
export TRAINER=CLIP_Adapter
export CFG="${CFG:-vit_b16}"
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
