#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): the CUDA tests, tools.bench in bf16 and amp, the smoke protocol, one
# summary (summary.json, summary.md, gpu_check.log) in --out, else $OUT, else output/gpu_check.
#
# Usage: scripts/gpu_check.sh [--out DIR] [--budget SECONDS]   the check (python -m tools.gpu_check --help)
#        scripts/gpu_check.sh --pack [DIR]                       wheels for a bare GPU machine into DIR (.whl)
# On a CUDA machine it takes under five minutes (--budget, default 290 s). Without CUDA it says so, runs the
# parts a CPU runs quickly (about a minute) and exits 0 when they pass.
#
# A bare GPU machine (the device tool's) has torch but not the packages of CARRIED below nor Dassl. There,
# when they do not import and .whl holds wheels, they are installed from .whl into a temporary folder (no
# network needed). --pack, on a machine with PyPI access, builds those wheels (versions of constraints.txt).
#
# Environment:
#   PYTHON     interpreter (default: .venv/bin/python when present, else python3)
#   DASSL_SRC  for --pack: a Dassl.pytorch folder or tarball (default ../shared/vendor/Dassl.pytorch-c61a1b5.tar.gz)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARRIED=(openai-clip ftfy wcwidth yacs gdown beautifulsoup4 soupsieve wilds setuptools)
WHEELS=.whl
SITE=${TMPDIR:-/tmp}/gpu_check_site

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

note() {
    printf '[gpu_check] %s\n' "$*" >&2
}

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not a command; set PYTHON to an interpreter with torch"

# pack DIR: wheels of CARRIED (pinned by constraints.txt) and of Dassl into DIR
pack() {
    local dir=$1 src=${DASSL_SRC:-../shared/vendor/Dassl.pytorch-c61a1b5.tar.gz} name pin pins=()
    for name in "${CARRIED[@]}"; do
        pin=$(grep -i -E "^${name}==" constraints.txt) || die "$name has no pinned version in constraints.txt"
        pins+=("$pin")
    done
    [[ -e $src ]] || die "DASSL_SRC=$src does not exist; point it at a Dassl.pytorch folder or tarball (commit c61a1b5)"
    mkdir -p "$dir"
    "$PYTHON" -m pip wheel -q --no-deps -w "$dir" "${pins[@]}"
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$src"
    note "$(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1), in $dir: carry it to the GPU machine"
}

# carried_packages: install .whl into SITE when the packages torch does not bring are missing
carried_packages() {
    if "$PYTHON" -c 'import clip, dassl, yacs' >/dev/null 2>&1; then
        return 0
    fi
    compgen -G "$WHEELS/*.whl" >/dev/null ||
        die "clip, dassl or yacs does not import with $PYTHON and $WHEELS holds no wheels: run 'make setup', or build them with 'scripts/gpu_check.sh --pack' where PyPI is reachable and carry $WHEELS"
    note "installing the wheels of $WHEELS into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

if [[ ${1:-} == --pack ]]; then
    pack "${2:-$WHEELS}"
    exit 0
fi
carried_packages
exec "$PYTHON" -m tools.gpu_check "$@"
