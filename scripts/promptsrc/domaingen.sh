#!/usr/bin/env bash
export TRAINER=PromptSRC
export CFG="${CFG:-vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets}"
exec bash "$(dirname "$0")/../protocols/domaingen.sh" "$@"
