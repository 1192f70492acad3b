#!/usr/bin/env bash
export TRAINER=PromptSRC
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
