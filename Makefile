# SlicerMedClass: `make run` trains and evaluates the quickstart model; `make test` runs the suite.
#
# The CPU environment pins torch to 2.13.0 (the CPU build). GPU users pick their
# CUDA build instead, e.g.  make install TORCH="torch==2.14.1"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint debian-tools bench clean label

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[all]"
	# Only its data file (3,955 IU chest X-ray reports) is used; --no-deps keeps
	# its torchvision requirement, which breaks beside the CPU torch, out.
	$(BIN)/pip install -q --no-deps torchxrayvision==1.5.7
	# MONAI Label without its sam2/torchvision requirements (pyproject's "label" extra
	# lists what its server needs), and the start-up hook that lets its pydicom-seg
	# import under pydicom 3 in every interpreter, the server's subprocesses included.
	$(BIN)/pip install -q --no-deps monailabel==0.8.5
	$(BIN)/python -m medclass.compat
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/medclass quickstart

# Serve the MONAI Label app: make label STUDIES=DIR [MODELS=resnet18] [CHECKPOINT=model.pt] [PORT=8000]
# (STUDIES may also be a DICOMweb URL, e.g. http://127.0.0.1:8042/dicom-web for Orthanc).
MODELS ?= resnet18
PORT   ?= 8000
label: install
	@test -n "$(STUDIES)" || { echo "usage: make label STUDIES=DIR-or-DICOMweb-URL [MODELS=...] [CHECKPOINT=...]"; exit 2; }
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/monailabel start_server --app monailabel_app --studies "$(STUDIES)" \
	  --host 127.0.0.1 --port $(PORT) --conf models $(MODELS) $(if $(CHECKPOINT),--conf checkpoint $(CHECKPOINT))

# The Debian tools real peers of the tests: Orthanc (PACS), dcmtk, dicom3tools.
debian-tools:
	@if command -v storescu >/dev/null && command -v dciodvfy >/dev/null && command -v Orthanc >/dev/null \
	  && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 \
	  && command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q orthanc orthanc-dicomweb dcmtk dicom3tools \
	    chromium chromium-driver; fi

lint: install
	$(BIN)/ruff check .

test: install debian-tools lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
