# fpe-node: the two commands of the README.
#   make run   creates the environment and starts the node on its embedded defaults
#   make test  sets up and passes the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: run test venv lint typecheck bench clean

$(STAMP): setup.cfg constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -U pip wheel setuptools
	$(PIP) -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/fpe-node serve

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

typecheck: $(STAMP)
	$(BIN)/mypy dicom_node inference reports

clean:
	rm -rf $(VENV) build *.egg-info
