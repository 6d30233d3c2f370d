# Two commands for a fresh clone:  `make run` (server on http://127.0.0.1:8000)  and  `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STUDIES ?= demo_studies
HOST    ?= 127.0.0.1
PORT    ?= 8000
DEMO_COUNT ?= 8
# Test files run on 2 pytest-xdist workers, one file per worker at a time (module fixtures stay whole).
TEST_WORKERS ?= 2
# MONAI Label re-launches `python` from PATH, so the venv's bin must come first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run run-pacs pacs-deps test venv demo clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: $(STUDIES)/manifest.csv

$(STUDIES)/manifest.csv: | venv
	$(PY) -m sarco_app phantom --count $(DEMO_COUNT) --seed 2024 --out $(STUDIES)

run: venv demo
	$(VENV)/bin/monailabel start_server --app apps/sarcopenia --studies $(STUDIES) \
		--host $(HOST) --port $(PORT)

# The web workflow: Orthanc (DICOMweb, loopback, storage in .pacs/) + server + OHIF.
# UPLOAD=/path/to/dicom adds a folder; PACS_AUTH=user:password turns Orthanc's authentication on.
ORTHANC_PORT ?= 8043
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

pacs-deps:
	@command -v Orthanc >/dev/null && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || \
		$(SUDO) apt-get install -y orthanc orthanc-dicomweb

run-pacs: venv pacs-deps
	$(PY) -m scripts.run_pacs --host $(HOST) --port $(PORT) --orthanc-port $(ORTHANC_PORT) \
		$(if $(UPLOAD),--upload $(UPLOAD)) $(if $(PACS_AUTH),--auth $(PACS_AUTH))

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean-demo:
	rm -rf $(STUDIES)
