#!/usr/bin/env bash
# Shared functions of the protocol scripts; sourced by base2new.sh, crossdata.sh, domaingen.sh and
# fewshot.sh (which set PROTOCOL first), never run on its own.
#
# Environment (the wrappers scripts/<trainer>/*.sh set TRAINER and CFG):
#   TRAINER     registered trainer name (CoOp, CoCoOp, MaPLe, ZeroshotCLIP, BiMoRS, ...); required
#   CFG         config name in configs/trainers/$TRAINER/ (no .yaml), or the path of a .yaml file; required
#   DATA        data root holding the dataset folders; required, except when every dataset is the
#               offline toyrs: it then defaults to ./data and ToyRS is generated there on first use
#   OUTPUT      output root (default: output)
#   PYTHON      Python interpreter (default: python)
#   SHOTS       shots per class (default 16; fewshot.sh: a list, default "1 2 4 8 16")
#   BACKBONE    CLIP backbone (e.g. toy, ViT-B/32): adds MODEL.BACKBONE.NAME and appends the name to
#               the config folder, so runs with another backbone never count as finished (default: the config's)
#   OPTS        default KEY VALUE options, split on spaces, placed before the ones after --
#   LOAD_EPOCH  checkpoint epoch that eval-only runs load (default: OPTIM.MAX_EPOCH of the options, else of CFG)
#   EVAL_ONLY   1 for trainers that learn nothing (ZeroshotCLIP): every run is --eval-only, no model is loaded
#   PRE_STEP    command prefix (split on spaces) run once per dataset, before any train.py run, as
#                 $PRE_STEP DATASET --root DATA --shots K --seeds S1 [S2 ...]
#               (fewshot.sh: once per dataset and K); e.g. PRE_STEP="python -m tools.captions" computes
#               BiMoRS's captions of the images the protocol uses. It runs in the repository root.
#   DRY_RUN     1: print every command (one per line, shell-quoted) instead of running it
# KEY VALUE options after -- are passed to train.py after the protocol's own. The protocol sets
# DATASET.NUM_SHOTS (use SHOTS), DATASET.SUBSAMPLE_CLASSES and BENCH.PROTOCOL, and MODEL.BACKBONE.NAME
# comes from BACKBONE: passing any of these as options is an error.
# A run folder holding results.json is finished and skipped: remove the folder to run it again.
# Messages go to stderr; stdout carries the commands (DRY_RUN), train.py's output and the final table.
set -euo pipefail

PROTOCOLS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$PROTOCOLS_DIR/../.." && pwd)
TOY_DATASET=toyrs   # generated offline by `python -m tools.prepare_data toyrs`, into $DATA/ToyRS/images
TOY_IMAGES=ToyRS/images

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

note() {
    printf '[%s] %s\n' "${PROTOCOL:-protocol}" "$*" >&2
}

# usage: the calling protocol's header comment, then the environment block above
usage() {
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
    echo
    awk '/^# Environment/ {on = 1} on && !/^#/ {exit} on {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
}

# abspath PATH: PATH made absolute against the caller's working directory
abspath() {
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/${1#./}" ;;
    esac
}

# run CMD...: print CMD shell-quoted (DRY_RUN) or echo it to stderr and run it
run() {
    local line
    line=$(printf '%q ' "$@")
    line=${line% }
    if [[ ${DRY_RUN:-0} != 0 ]]; then
        printf '%s\n' "$line"
    else
        note "+ $line"
        "$@"
    fi
}

# parse_args WANT_DATASET ARGS...: sets DATASET (WANT_DATASET=1), SEEDS and EXTRA_OPTS
parse_args() {
    local want_dataset=$1
    shift
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        usage
        exit 0
    fi
    if ((want_dataset)); then
        if [[ $# -eq 0 || $1 == -- ]]; then
            die "missing DATASET: $(basename "$0") DATASET [SEEDS...] [-- KEY VALUE ...] (--help for more)"
        fi
        # shellcheck disable=SC2034 # read by the protocol scripts
        DATASET=$1
        shift
    fi
    SEEDS=()
    while (($#)) && [[ $1 != -- ]]; do
        [[ $1 =~ ^[1-9][0-9]*$ ]] ||
            die "seed '$1' is not a positive integer; put KEY VALUE options for train.py after '--' (e.g. -- OPTIM.MAX_EPOCH 5)"
        SEEDS+=("$1")
        shift
    done
    if ((${#SEEDS[@]} == 0)); then
        SEEDS=(1 2 3)
    fi
    if (($#)); then
        shift # the -- separator
    fi
    local env_opts=()
    read -r -a env_opts <<<"${OPTS:-}"
    EXTRA_OPTS=("${env_opts[@]}" "$@")
    check_opts
}

# check_opts: EXTRA_OPTS are KEY VALUE pairs of config keys the protocol does not own; notes OPT_MAX_EPOCH
check_opts() {
    local i key
    OPT_MAX_EPOCH=""
    ((${#EXTRA_OPTS[@]} % 2 == 0)) ||
        die "options after -- (and OPTS) must be KEY VALUE pairs; got an odd number: ${EXTRA_OPTS[*]}"
    for ((i = 0; i < ${#EXTRA_OPTS[@]}; i += 2)); do
        key=${EXTRA_OPTS[i]}
        [[ $key =~ ^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$ ]] ||
            die "'$key' is not a config key; options after -- are KEY VALUE pairs such as OPTIM.MAX_EPOCH 5"
        case $key in
            DATASET.NUM_SHOTS) die "set the shots with SHOTS=N (it also names the output folder), not with -- $key" ;;
            MODEL.BACKBONE.NAME) die "set the backbone with BACKBONE=NAME (it also names the output folder), not with -- $key" ;;
            DATASET.SUBSAMPLE_CLASSES | BENCH.PROTOCOL) die "$key is set by the $PROTOCOL protocol; do not pass it after --" ;;
            OPTIM.MAX_EPOCH) OPT_MAX_EPOCH=${EXTRA_OPTS[i + 1]} ;;
        esac
    done
}

# dataset_file NAME: the dataset config of NAME (relative to the repository root)
dataset_file() {
    printf 'configs/datasets/%s.yaml\n' "$1"
}

# yaml_names DIR: the names of the .yaml files in DIR, space-separated ('(none)' when there are none)
yaml_names() {
    local f names=()
    for f in "$1"/*.yaml; do
        if [[ -f $f ]]; then
            names+=("$(basename "$f" .yaml)")
        fi
    done
    printf '%s\n' "${names[*]:-(none)}"
}

# yaml_get FILE KEY.PATH: a value of a yaml file ('' when absent)
yaml_get() {
    "$PYTHON" -c '
import sys, yaml
node = yaml.safe_load(open(sys.argv[1])) or {}
for key in sys.argv[2].split("."):
    node = node.get(key) if isinstance(node, dict) else None
print("" if node is None else node)' "$1" "$2"
}

# setup DATASET...: check the environment and the datasets, resolve paths, cd to the repository root
setup() {
    : "${TRAINER:?is not set: run a wrapper such as scripts/coop/$PROTOCOL.sh, or export TRAINER=CoOp}"
    : "${CFG:?is not set: run a wrapper such as scripts/coop/$PROTOCOL.sh, or export CFG=<config name in configs/trainers/$TRAINER/>}"
    PYTHON=${PYTHON:-python}
    if [[ $PYTHON == */* ]]; then
        PYTHON=$(abspath "$PYTHON")
    fi
    command -v "$PYTHON" >/dev/null ||
        die "PYTHON=$PYTHON is not a command; set PYTHON to the interpreter of your environment (e.g. PYTHON=.venv/bin/python)"
    local d only_toy=1
    for d in "$@"; do
        [[ $d == "$TOY_DATASET" ]] || only_toy=0
    done
    if ((only_toy)); then
        DATA=${DATA:-./data}
    fi
    : "${DATA:?is not set: export DATA=/path/to/datasets (the folder holding PatternNet/, RSICD/, ...; see DATASETS.md), or run on the offline dataset toyrs}"
    DATA=$(abspath "$DATA")
    OUTPUT=$(abspath "${OUTPUT:-output}")
    if [[ $CFG == *.yaml ]]; then
        CFG_FILE=$(abspath "$CFG")
    else
        CFG_FILE=configs/trainers/$TRAINER/$CFG.yaml
    fi
    cd "$REPO_ROOT"
    if [[ ! -f $CFG_FILE ]]; then
        die "config $CFG_FILE does not exist; set CFG to one of: $(yaml_names "configs/trainers/$TRAINER"), or to the path of a .yaml file"
    fi
    CFG_NAME=$(basename "$CFG_FILE" .yaml)
    CFG_DIR=$CFG_NAME
    if [[ -n ${BACKBONE:-} ]]; then
        CFG_DIR=${CFG_NAME}_${BACKBONE//[^A-Za-z0-9]/}
    fi
    for d in "$@"; do
        if [[ ! -f $(dataset_file "$d") ]]; then
            die "unknown dataset '$d': no $(dataset_file "$d"); choose one of: $(yaml_names configs/datasets)"
        fi
    done
    read -r -a SHOTS_LIST <<<"${SHOTS:-${DEFAULT_SHOTS:-16}}"
    ((${#SHOTS_LIST[@]})) || die "SHOTS is empty; set SHOTS=16 (or unset it)"
    for d in "${SHOTS_LIST[@]}"; do
        [[ $d =~ ^[1-9][0-9]*$ ]] || die "SHOTS='${SHOTS:-}' must be positive integers (shots per class), e.g. SHOTS=16"
    done
    if ((${#SHOTS_LIST[@]} > 1)) && [[ $PROTOCOL != fewshot ]]; then
        die "SHOTS='$SHOTS' must be one number for $PROTOCOL (lists are for fewshot.sh)"
    fi
    SHOTS=${SHOTS_LIST[0]}
    note "trainer $TRAINER, config $CFG_FILE, datasets $*, seeds ${SEEDS[*]}, shots ${SHOTS_LIST[*]}, output $OUTPUT"
}

# resolve_load_epoch: sets LOAD_EPOCH, the checkpoint epoch that eval-only runs load
resolve_load_epoch() {
    if [[ ${EVAL_ONLY:-0} != 0 ]]; then
        return 0
    fi
    LOAD_EPOCH=${LOAD_EPOCH:-$OPT_MAX_EPOCH}
    if [[ -z $LOAD_EPOCH ]]; then
        LOAD_EPOCH=$(yaml_get "$CFG_FILE" OPTIM.MAX_EPOCH)
    fi
    [[ $LOAD_EPOCH =~ ^[1-9][0-9]*$ ]] ||
        die "cannot tell which checkpoint to evaluate: $CFG_FILE sets no OPTIM.MAX_EPOCH (got '$LOAD_EPOCH'); set LOAD_EPOCH=N"
}

# prepare DATASET...: per distinct dataset, generate ToyRS if missing (once), then run $PRE_STEP
prepare() {
    local d seen=" " pre=()
    read -r -a pre <<<"${PRE_STEP:-}"
    for d in "$@"; do
        [[ $seen == *" $d "* ]] && continue
        seen+="$d "
        if [[ $d == "$TOY_DATASET" && ! -d $DATA/$TOY_IMAGES && -z ${TOY_GENERATED:-} ]]; then
            run "$PYTHON" -m tools.prepare_data "$d" --root "$DATA"
            TOY_GENERATED=1
        fi
        if ((${#pre[@]})); then
            run "${pre[@]}" "$d" --root "$DATA" --shots "$SHOTS" --seeds "${SEEDS[@]}"
        fi
    done
}

# run_dir PHASE DATASET SEED: the CoOp-style run folder
run_dir() {
    printf '%s\n' "$OUTPUT/$PROTOCOL/$1/$2/shots_$SHOTS/$TRAINER/$CFG_DIR/seed$3"
}

# train_py OUT DATASET SEED SUBSAMPLE MODEL_DIR [KEY VALUE...]: one train.py run into OUT, skipped when
# OUT/results.json exists. MODEL_DIR empty: train (Dassl then tests); else evaluate MODEL_DIR's checkpoint
# of epoch LOAD_EPOCH. With EVAL_ONLY=1 both only evaluate.
train_py() {
    local out=$1 dataset=$2 seed=$3 subsample=$4 model_dir=$5
    shift 5
    if [[ -f $out/results.json ]]; then
        note "skip (finished): $out"
        return 0
    fi
    local flags=() opts=(DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES "$subsample" BENCH.PROTOCOL "$PROTOCOL")
    if [[ ${EVAL_ONLY:-0} != 0 ]]; then
        flags=(--eval-only)
    elif [[ -n $model_dir ]]; then
        flags=(--eval-only --model-dir "$model_dir" --load-epoch "$LOAD_EPOCH")
    fi
    if [[ -n ${BACKBONE:-} ]]; then
        opts+=(MODEL.BACKBONE.NAME "$BACKBONE")
    fi
    run "$PYTHON" train.py --root "$DATA" --seed "$seed" --trainer "$TRAINER" \
        --dataset-config-file "$(dataset_file "$dataset")" --config-file "$CFG_FILE" --output-dir "$out" \
        "${flags[@]}" "${opts[@]}" "$@" "${EXTRA_OPTS[@]}"
}

# summarize DIR...: this protocol's table over DIR (tools.results), or the accuracies found without it
summarize() {
    if [[ -f tools/results.py ]]; then
        run "$PYTHON" -m tools.results "$@" --protocol "$PROTOCOL" --seeds "${SEEDS[@]}" ||
            note "tools.results failed (see above); the run folders are kept"
    else
        run grep -r --include=results.json '"accuracy"' "$@" || note "no results.json found under $*"
    fi
}

# run_transfer DEFAULT_SOURCE DEFAULT_TARGETS ARGS...: train on SOURCE (all classes), evaluate on each target
run_transfer() {
    local source=${SOURCE:-$1} targets=() source_name seed train_dir target
    read -r -a targets <<<"${TARGETS:-$2}"
    shift 2
    parse_args 0 "$@"
    setup "$source" "${targets[@]}"
    resolve_load_epoch
    prepare "$source" "${targets[@]}"
    source_name=$(yaml_get "$(dataset_file "$source")" DATASET.NAME)
    for seed in "${SEEDS[@]}"; do
        train_dir=$(run_dir train "$source" "$seed")
        train_py "$train_dir" "$source" "$seed" all ""
        for target in "${targets[@]}"; do
            train_py "$(run_dir test "$target" "$seed")" "$target" "$seed" all "$train_dir" \
                BENCH.SOURCE_DATASET "$source_name"
        done
    done
    summarize "$OUTPUT/$PROTOCOL"
}
