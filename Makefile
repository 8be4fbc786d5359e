# The README's commands. `make demo` = the main job, `make test` = the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/cifar10-jpeg.tar.gz
OUT ?= runs/demo

.PHONY: venv demo ui test bench clean env images compose-test

$(BIN)/bitsearch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/bitsearch

# the committed CPU reference model and its Hessian sensitivity table (models/README.md)
REF ?= models/mobilenetv2-w0.5-cpu.pt
REF_TABLE ?= models/mobilenetv2-w0.5-cpu.sensitivity.json
DEMO_SECONDS ?= 480

# "the smallest model within 1 point": bisection over the allocator's size budgets on the reference model,
# PTQ trials one at a time on every core, ended by DEMO_SECONDS; the quick toy baseline where there is no
# reference model
demo: venv
ifneq ($(wildcard $(REF)),)
	$(BIN)/bitsearch search --baseline $(REF) --sensitivity $(REF_TABLE) --max-drop 1.0 --time-budget $(DEMO_SECONDS) \
		--num-samples 8 --cpus-per-trial $$(nproc) --name within-1pt --data $(DATA) --out $(OUT)
else
	test -f $(OUT)/baseline/checkpoint.pt || $(BIN)/bitsearch train --profile quick --data $(DATA) --out $(OUT)/baseline
	$(BIN)/bitsearch search --config configs/quick.yaml --baseline $(OUT)/baseline/checkpoint.pt --data $(DATA) --out $(OUT)
endif

ui: venv    # the MLflow UI on the demo's embedded store (OUT=... for another search's --out)
	$(BIN)/bitsearch ui $(OUT)

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: venv
	$(BIN)/python bench/throughput.py --data $(DATA) --out docs/bench/throughput-cpu.json

# The deployment (docker-compose.yml): .env with generated secrets, the images (built locally when no registry
# answers, tagged by content), and the whole stack run for real (docker/compose_test.py; ~6-8 min on 2 cores
# once the images exist, ~15 min more for their first build).
env: .env
.env:
	@umask 077; $(PY) -c "import secrets, pathlib; t = secrets.token_hex; print(f'POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD={t(16)}\nPOSTGRES_DB=mlflow\nMLFLOW_ADMIN_PASSWORD={t(16)}\nMLFLOW_SECRET_KEY={t(32)}\nRAY_AUTH_TOKEN={t(32)}\nMLFLOW_PORT=5000\nDATA_DIR={pathlib.Path(\"$(DATA)\").resolve().parent}\nMODELS_DIR={pathlib.Path(\"models\").resolve()}')" > .env
	@echo "wrote .env (secrets generated; the MLflow admin password is MLFLOW_ADMIN_PASSWORD)"

images:
	docker/images.sh

compose-test: venv env images
	$(BIN)/python docker/compose_test.py

clean:
	rm -rf $(VENV) runs
