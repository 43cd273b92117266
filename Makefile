# nanov4: two commands for a newcomer.
#   make run    train the nano V4 model on the embedded corpus (CPU, a few minutes), then sample
#   make test   run the test suite (CPU)
# Each uses the python3 on the PATH when it already imports every dependency (the GPU machines,
# which have no network), otherwise a virtual environment .venv made on first use.

HAVE_DEPS := $(shell python3 -c "import torch, numpy, tiktoken, tqdm, pytest, triton" >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_DEPS),yes)
PYTHON := python3
DEPS :=
else
PYTHON := .venv/bin/python
DEPS := .venv/.installed
endif

.PHONY: run test clean

run: $(DEPS)
	$(PYTHON) train.py --preset nano --out-dir out/nano
	$(PYTHON) sample.py --ckpt out/nano/ckpt.pt --prompt "def parse_args(argv):" --max-new-tokens 200

test: $(DEPS)
	$(PYTHON) -m pytest -q tests

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/python -m pip install --upgrade pip -q
	.venv/bin/python -m pip install -r requirements.txt
	touch $@

clean:
	rm -rf out cache .venv
