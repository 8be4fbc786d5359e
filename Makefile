# The README's commands. `make demo` = the main job, `make test` = the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar10-jpeg.tar.gz
OUT ?= runs/demo

.PHONY: venv demo test bench clean

$(BIN)/bitsearch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/bitsearch

demo: venv
	$(BIN)/bitsearch train --profile quick --data $(DATA) --out $(OUT)/baseline

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/pipeline.py --data $(DATA)

clean:
	rm -rf $(VENV) runs
