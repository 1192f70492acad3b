#!/usr/bin/env bash
export TRAINER=PromptSRC
exec bash "$(dirname "$0")/../protocols/crossdata.sh" "$@"
