# fpe-node: the two commands of the README.
#   make run   creates the environment and starts the node on its embedded defaults
#   make test  sets up and passes the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed
OHIF_VERSION ?= 3.13.2
OHIF   := .cache/ohif-$(OHIF_VERSION)/dist/index.html

.PHONY: run test demo venv viewer lint typecheck bench clean

$(STAMP): setup.cfg constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -U pip wheel setuptools
	$(PIP) -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The OHIF viewer used by the viewer tests and `make demo` (npm package @ohif/app).
$(OHIF):
	OHIF_VERSION=$(OHIF_VERSION) bash deploy/viewer/install_ohif.sh

viewer: $(OHIF)

run: $(STAMP)
	$(BIN)/fpe-node serve

# The Debian peers (DCMTK, Orthanc, PostgreSQL...) come first: no test is skipped for want of
# them. Without FPENODE_TEST_POSTGRES_URL, deploy/test-postgres.sh runs the suite against a
# throw-away PostgreSQL cluster of the installed server (temporary folder, free port), removed after.
test: $(STAMP) $(OHIF)
	bash deploy/debian-packages.sh
	bash deploy/test-postgres.sh $(BIN)/python -m pytest -n 2 --dist loadgroup

# Orthanc + OHIF + fpe-node on loopback with a synthetic study; prints the viewer URL. Ctrl-C stops it.
demo: $(STAMP) $(OHIF)
	bash deploy/debian-packages.sh orthanc orthanc-dicomweb
	$(BIN)/python deploy/demo.py

typecheck: $(STAMP)
	$(BIN)/mypy dicom_node inference reports

clean:
	rm -rf $(VENV) build *.egg-info
