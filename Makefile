# Two commands for a newcomer: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ichfed-installed
DEMO_OUT ?= demo_out

.PHONY: demo test test-fast install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The reader page's browser tests drive Debian's Chromium (Playwright cannot download a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  (apt-get update -q && apt-get install -y -q chromium) >/dev/null; }

demo: $(STAMP)
	$(BIN)/ichfed demo --out $(DEMO_OUT)

# Thread counts are fixed so that the trained-model tests run the same arithmetic on every machine
# (docs/segmentation.md, "Reproducibility"): results then differ only by CPU instruction set.
TEST_ENV := OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2

test: $(STAMP) browser
	$(TEST_ENV) $(BIN)/python -m pytest -q --timeout=1500 --durations=25

# The edit loop: everything that needs no trained model, no deployment and no browser (about 3 minutes).
test-fast: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" --timeout=600

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
