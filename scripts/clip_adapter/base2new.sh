#!/usr/bin/env bash
export TRAINER=CLIP_Adapter
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
