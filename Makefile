# Two entry points: `make test` and `make demo`. Each creates .venv and installs what it needs.
#
# Dassl.pytorch is not on PyPI. It is installed from DASSL_SRC (a local Dassl.pytorch folder or a source
# tarball such as Dassl.pytorch-c61a1b5.tar.gz) when given, else cloned from GitHub at the pinned commit.
# `make demo` stops when neither works; `make test` then goes on without it and pytest says, in one loud
# line, how many tests skip (under CI=true such a skip is a failure).
#
# CONSTRAINTS pins every package to the versions the suite last passed with (constraints.txt);
# `CONSTRAINTS= make setup` installs against the lower bounds of requirements.txt only (another torch/CUDA).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DASSL_COMMIT := c61a1b5
DASSL_URL := https://github.com/KaiyangZhou/Dassl.pytorch
DASSL_SRC ?=
CONSTRAINTS ?= constraints.txt
SEEDS ?= 1 2 3 4 5

.PHONY: setup dassl dassl-if-possible test test-seeds lint demo gpu-check freeze clean

$(VENV)/.installed: requirements.txt requirements-dev.txt $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(PIP) install -q --no-deps wilds==1.2.2 $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

## setup: .venv with the runtime and dev requirements, and Dassl when it can be installed
setup: dassl-if-possible

# Installs Dassl (DASSL_SRC, else GitHub at the pinned commit) unless it is already there; exit 2 on failure.
define INSTALL_DASSL
	if $(PY) -c "import dassl" 2>/dev/null; then exit 0; fi; \
	src="$(DASSL_SRC)"; \
	if [ -z "$$src" ]; then \
		echo "Installing Dassl.pytorch@$(DASSL_COMMIT) from GitHub (set DASSL_SRC to install from a local copy)"; \
		rm -rf $(VENV)/src/Dassl.pytorch; \
		git clone -q $(DASSL_URL) $(VENV)/src/Dassl.pytorch 2>&1 && \
		git -C $(VENV)/src/Dassl.pytorch checkout -q $(DASSL_COMMIT) && \
		src=$(VENV)/src/Dassl.pytorch || { \
			echo "Could not clone $(DASSL_URL). On a machine with network, clone it at $(DASSL_COMMIT) (or download the tarball of that commit) and run again with DASSL_SRC=/path/to/Dassl.pytorch[.tar.gz]." >&2; exit 2; }; \
	elif [ ! -e "$$src" ]; then \
		echo "DASSL_SRC=$$src does not exist; point it at a Dassl.pytorch folder or source tarball (commit $(DASSL_COMMIT))." >&2; exit 2; \
	else \
		echo "Installing Dassl.pytorch from $$src"; \
	fi; \
	$(PIP) install -q --no-deps --no-build-isolation "$$src" || { \
		echo "pip could not install Dassl.pytorch from $$src (a Dassl.pytorch folder or source tarball is expected)." >&2; exit 2; }
endef

## dassl: make sure Dassl is installed (DASSL_SRC folder or tarball, else GitHub at the pinned commit)
dassl: $(VENV)/.installed
	@$(INSTALL_DASSL)

dassl-if-possible: $(VENV)/.installed
	@($(INSTALL_DASSL)) || echo "!!! Going on WITHOUT Dassl.pytorch: its tests will skip (pytest counts them below). Fix: DASSL_SRC=/path/to/Dassl.pytorch[.tar.gz] make test" >&2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck -x scripts/*/*.sh scripts/*.sh .ci/run

## test: install (Dassl too, when possible), lint (ruff, shellcheck) and run the offline test suite
test: setup lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs

## test-seeds: the suite under several seeds (SEEDS), each in a shuffled order
test-seeds: setup
	@for s in $(SEEDS); do \
		echo "== pytest --test-seed $$s --shuffle"; \
		HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs -p no:cacheprovider --test-seed $$s --shuffle || exit 1; \
	done

## demo: the embedded default: BiMoRS base-to-new on ToyRS, offline, toy backbone, CPU
demo: dassl
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/bimors/base2new.sh

## gpu-check: the prepared GPU check (docs/gpu.md): CUDA tests, benchmark, smoke run; CPU-runnable parts without CUDA
# No dependency on the venv: on a bare GPU machine the script installs carried wheels itself (GPU_CHECK_ARGS: --out, --budget).
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

## freeze: rewrite constraints.txt from .venv (after a green `make test` with new versions)
freeze:
	{ echo "# Exact versions the test suite last passed with (make freeze); used by make setup (CONSTRAINTS=)."; \
	  echo "# requirements.txt keeps the lower bounds and why each package is needed. Dassl is installed apart."; \
	  $(PIP) freeze --all --exclude-editable | grep -v -i -E '^(dassl|pip)[=@ ]' | LC_ALL=C sort -f; } > constraints.txt

clean:
	rm -rf $(VENV) output .pytest_cache .ruff_cache
