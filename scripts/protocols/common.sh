#!/usr/bin/env bash
# Shared part of the protocol scripts; sourced by base2new.sh, crossdata.sh, domaingen.sh and fewshot.sh
# (which set PROTOCOL first), never run on its own. The protocol logic lives in the Python planner
# (tools/planner.py); this file hands the arguments and the environment below to `python -m tools.protocol`.
#
# Environment (the wrappers scripts/<trainer>/*.sh set TRAINER):
#   TRAINER     registered trainer name (CoOp, CoCoOp, MaPLe, ZeroshotCLIP, BiMoRS, ...); required
#   CFG         config name in configs/trainers/$TRAINER/ (no .yaml), or the path of a .yaml file
#               (default: the trainer's config for the protocol, see TRAINERS in tools/planner.py)
#   DATA        data root holding the dataset folders; required, except when every dataset is the
#               offline toyrs: it then defaults to ./data and ToyRS is generated there on first use
#   OUTPUT      output root (default: output)
#   PYTHON      Python interpreter (default: python)
#   SHOTS       shots per class (default 16; fewshot.sh: a list, default "1 2 4 8 16")
#   BACKBONE    CLIP backbone (e.g. toy, ViT-B/32): adds MODEL.BACKBONE.NAME and appends the name to
#               the config folder, so runs with another backbone never count as finished (default: the config's)
#   OPTS        default KEY VALUE options, split on spaces, placed before the ones after --
#   LOAD_EPOCH  checkpoint epoch that eval-only runs load (default: OPTIM.MAX_EPOCH of the options, else of CFG)
#   EVAL_ONLY   1: every run is --eval-only and no model is loaded (default: 1 for trainers that learn
#               nothing, such as ZeroshotCLIP)
#   PRE_STEP    command prefix (split on spaces) run once per dataset, before any train.py run, as
#                 $PRE_STEP DATASET --root DATA --shots K --seeds S1 [S2 ...]
#               (fewshot.sh: once per dataset and K). BiMoRS's default computes its captions
#               (python -m tools.captions) with CAPTIONER / CAPTION_ENCODER (default: the config's). It runs
#               in the repository root.
#   DRY_RUN     1: print every command (one per line, shell-quoted) instead of running it
#   FORCE       1: rerun the finished runs whose recorded config differs from what is asked (their folders
#               are deleted first); without it such a run stops the script with the differing keys
# KEY VALUE options after -- are passed to train.py after the protocol's own. The protocol sets
# DATASET.NUM_SHOTS (use SHOTS), DATASET.SUBSAMPLE_CLASSES and BENCH.PROTOCOL, and MODEL.BACKBONE.NAME
# comes from BACKBONE: passing any of these as options is an error.
# A run folder holding results.json is finished and skipped when its config.yaml records the values asked
# for; remove the folder to run it again. DATA and OUTPUT are checked before any run starts.
# Messages go to stderr; stdout carries the commands (DRY_RUN), train.py's output and the final table.
# Every bad input ends with one "error:" line naming the fix, and exit code 2.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# usage: the calling protocol's header comment, then the environment block above
usage() {
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
    echo
    awk '/^# Environment/ {on = 1} on && !/^#/ {exit} on {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
}

# protocol_main ARGS...: --help, else plan and run $PROTOCOL with the Python planner
protocol_main() {
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        usage
        exit 0
    fi
    PYTHON=${PYTHON:-python}
    if ! command -v "$PYTHON" >/dev/null; then
        printf 'error: %s\n' "PYTHON=$PYTHON is not a command; set PYTHON to the interpreter of your environment (e.g. PYTHON=.venv/bin/python)" >&2
        exit 2
    fi
    export PYTHON
    PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m tools.protocol "$PROTOCOL" "$(basename "$0")" "$@"
}
