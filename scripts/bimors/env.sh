#!/usr/bin/env bash
# Sourced (without arguments) by the BiMoRS wrappers after they set TRAINER, CFG and PROTOCOL_NAME.
# 1. Captions: the protocol's pre-step computes (resumably) the captions of every image the runs read, with
#    CAPTIONER / CAPTION_ENCODER (defaults: the published BLIP-2 and BERT), and passes the same models to
#    train.py (TRAINER.BIMORS.CAPTIONER / CAPTION_ENCODER).
# 2. The embedded default: `bash scripts/bimors/base2new.sh` with no DATASET runs the whole protocol offline
#    on ToyRS (generated if absent) with the random `toy` backbone and the tiny toy captioner/encoder, on CPU.
#    It is a smoke run: its accuracies mean nothing.
if [[ ${PROTOCOL_NAME:-} == base2new && ( $# -eq 0 || ${1:-} == -- ) ]]; then
    set -- toyrs "$@"
    export BACKBONE="${BACKBONE:-toy}"
    CAPTIONER="${CAPTIONER:-toy-blip2}"
    CAPTION_ENCODER="${CAPTION_ENCODER:-toy-bert}"
    export OPTS="${OPTS:-DATALOADER.NUM_WORKERS 2}"
    printf '%s\n' "[bimors] SMOKE RUN: no dataset given, so the BiMoRS base-to-new protocol runs offline on ToyRS" \
        "[bimors] with a RANDOM toy CLIP backbone and toy captioner/encoder: the numbers below mean nothing." \
        "[bimors] For the real protocol: DATA=/path/to/data bash scripts/bimors/base2new.sh patternnet" >&2
fi
CAPTIONER="${CAPTIONER:-Salesforce/blip2-flan-t5-xl}"
CAPTION_ENCODER="${CAPTION_ENCODER:-bert-base-uncased}"
export PRE_STEP="${PRE_STEP:-${PYTHON:-python} -m tools.captions --captioner $CAPTIONER --encoder $CAPTION_ENCODER}"
export OPTS="${OPTS:+$OPTS }TRAINER.BIMORS.CAPTIONER $CAPTIONER TRAINER.BIMORS.CAPTION_ENCODER $CAPTION_ENCODER"
