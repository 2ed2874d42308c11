# SlicerMedClass: `make run` trains and evaluates the quickstart model; `make test` runs the suite.
#
# torch is pinned to 2.13.0. Which build pip takes depends on where it looks:
#   make install                      plain PyPI: on Linux that is the CUDA build (several GB of CUDA
#                                     libraries; it runs on CPU too). Works wherever PyPI does.
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                                     the lean CPU build (~200 MB) from PyTorch's own CPU index, where
#                                     that index is reachable.
# GPU users pick their CUDA build instead, e.g.  make install TORCH="torch==2.14.1"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
# make run NO_NODE=1: train and evaluate, without starting the DICOM node at the end
NO_NODE ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint debian-tools bench clean label

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "Installing $(TORCH)$(if $(TORCH_INDEX), from $(TORCH_INDEX), from the default index: on Linux PyPI this is the CUDA build (several GB); see the Makefile's first lines for the lean CPU build)"
	$(BIN)/pip install --progress-bar on $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
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
	$(BIN)/medclass quickstart $(if $(NO_NODE),--no-node)

# Serve the MONAI Label app: make label STUDIES=DIR [MODELS=resnet18] [CHECKPOINT=model.pt] [PORT=8000]
# (STUDIES may also be a DICOMweb URL, e.g. http://127.0.0.1:8042/dicom-web for Orthanc).
MODELS ?= resnet18
PORT   ?= 8000
label: install
	@test -n "$(STUDIES)" || { echo "usage: make label STUDIES=DIR-or-DICOMweb-URL [MODELS=...] [CHECKPOINT=...]"; exit 2; }
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/monailabel start_server --app monailabel_app --studies "$(STUDIES)" \
	  --host 127.0.0.1 --port $(PORT) --conf models $(MODELS) $(if $(CHECKPOINT),--conf checkpoint $(CHECKPOINT))

# The Debian tools real peers of the tests: Orthanc (PACS), dcmtk, dicom3tools. The tests start
# their own Orthanc on a free loopback port, so the packages are installed without starting
# Orthanc's system service (a temporary policy-rc.d says "no" to service starts, as in containers).
DEBIAN_PACKAGES := orthanc orthanc-dicomweb dcmtk dicom3tools chromium chromium-driver
debian-tools:
	@if command -v storescu >/dev/null && command -v dciodvfy >/dev/null && command -v Orthanc >/dev/null \
	  && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 \
	  && command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "The tests need Debian's $(DEBIAN_PACKAGES). Installing them with apt-get$${SUDO:+ (sudo asks for your password)};"; \
	  echo "Orthanc's system service is NOT started: the tests run their own Orthanc on loopback."; \
	  $$SUDO apt-get update -q && \
	  if [ -e /usr/sbin/policy-rc.d ]; then \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(DEBIAN_PACKAGES); \
	  else \
	    printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null && $$SUDO chmod +x /usr/sbin/policy-rc.d; \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(DEBIAN_PACKAGES); rc=$$?; \
	    $$SUDO rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	  fi; fi

lint: install
	$(BIN)/ruff check .

test: install debian-tools lint
	$(BIN)/python -m pytest -q

# Every benchmark in bench/ (about an hour on 2 CPU cores), then BENCHMARKS.md from their results.
bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
