# The README's commands. `make demo` = the main job, `make test` = the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar10-jpeg.tar.gz
OUT ?= runs/demo

.PHONY: venv demo ui test bench clean

$(BIN)/bitsearch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/bitsearch

demo: venv
	test -f $(OUT)/baseline/checkpoint.pt || $(BIN)/bitsearch train --profile quick --data $(DATA) --out $(OUT)/baseline
	$(BIN)/bitsearch search --config configs/quick.yaml --baseline $(OUT)/baseline/checkpoint.pt --data $(DATA) --out $(OUT)

ui: venv    # the MLflow UI on the demo's embedded store (OUT=... for another search's --out)
	$(BIN)/bitsearch ui $(OUT)

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: venv
	$(BIN)/python bench/throughput.py --data $(DATA) --out docs/bench/throughput-cpu.json

clean:
	rm -rf $(VENV) runs
