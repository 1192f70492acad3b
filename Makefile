# Two entry points: `make test` and `make demo`. Each creates .venv and installs what it needs.
# Dassl.pytorch (not on PyPI) is installed from DASSL_SRC (a local checkout) when given, else from GitHub
# (pinned commit) by `make dassl`; `make test` runs without it (its tests skip with a reason).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DASSL_COMMIT := c61a1b5
DASSL_URL := https://github.com/KaiyangZhou/Dassl.pytorch
# A local Dassl checkout to install from (offline clusters, CI); defaults to /opt/Dassl.pytorch if it exists.
DASSL_SRC ?= $(wildcard /opt/Dassl.pytorch)

.PHONY: setup dassl test lint demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps wilds==1.2.2
	touch $@

## setup: create .venv with the runtime and dev requirements (+ Dassl from DASSL_SRC when set)
setup: $(VENV)/.installed
	@if [ -n "$(DASSL_SRC)" ] && ! $(PY) -c "import dassl" 2>/dev/null; then \
		echo "Installing Dassl from $(DASSL_SRC)"; \
		$(PIP) install -q --no-deps --no-build-isolation -e "$(DASSL_SRC)"; \
	fi

## dassl: make sure Dassl is installed (local DASSL_SRC, else GitHub at the pinned commit)
dassl: setup
	@if ! $(PY) -c "import dassl" 2>/dev/null; then \
		echo "Installing Dassl.pytorch@$(DASSL_COMMIT) from GitHub"; \
		rm -rf $(VENV)/src/Dassl.pytorch; \
		git clone -q $(DASSL_URL) $(VENV)/src/Dassl.pytorch && \
		git -C $(VENV)/src/Dassl.pytorch checkout -q $(DASSL_COMMIT) && \
		$(PIP) install -q --no-deps --no-build-isolation -e $(VENV)/src/Dassl.pytorch || { \
		echo "Could not install Dassl.pytorch. Clone $(DASSL_URL) at $(DASSL_COMMIT) on a machine with network and run: DASSL_SRC=/path/to/Dassl.pytorch make demo" >&2; exit 2; }; \
	fi

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck -x scripts/*/*.sh

## test: lint (ruff, shellcheck) and the offline test suite
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs

## demo: the embedded default: BiMoRS base-to-new on ToyRS, offline, toy backbone, CPU
demo: dassl
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/bimors/base2new.sh

clean:
	rm -rf $(VENV) output .pytest_cache .ruff_cache
