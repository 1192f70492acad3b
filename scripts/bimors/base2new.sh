#!/usr/bin/env bash
export TRAINER=BiMoRS
# The embedded default: with no DATASET, the whole protocol runs offline on ToyRS (generated if absent) with
# the random `toy` backbone and the tiny toy captioner/encoder, on CPU. It is a smoke run: its accuracies
# mean nothing. (Captions come from CAPTIONER / CAPTION_ENCODER, default: the config's, or the toy ones for
# ToyRS, tools/planner.py.)
if [[ $# -eq 0 || ${1:-} == -- ]]; then
    set -- toyrs "$@"
    export BACKBONE="${BACKBONE:-toy}"
    export OPTS="${OPTS:-DATALOADER.NUM_WORKERS 2}"
    printf '%s\n' "[bimors] SMOKE RUN: no dataset given, so the BiMoRS base-to-new protocol runs offline on ToyRS" \
        "[bimors] with a RANDOM toy CLIP backbone and toy captioner/encoder: the numbers below mean nothing." \
        "[bimors] For the real protocol: DATA=/path/to/data bash scripts/bimors/base2new.sh patternnet" >&2
fi
exec bash "$(dirname "$0")/../protocols/base2new.sh" "$@"
