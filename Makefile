# `make demo` and `make test` do all set-up: a .venv with the CPU build of torch and the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A pinned torch first, so that pip does not pull a multi-GB CUDA build on a CPU machine.
# On a GPU machine: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' install
TORCH_SPEC ?= torch==2.13.0

.PHONY: install system-deps demo demo-bert test clean

# Debian packages the tests use (espeak-ng speaks real audio for the audio writer's test,
# chromium opens `pretrain report`'s page headless; the Slurm tests install their own packages
# through slurm/local-cluster.sh). Only as root with apt; elsewhere those tests skip and say why.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { ! command -v espeak-ng >/dev/null || ! command -v chromium >/dev/null; }; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng chromium >/dev/null; fi

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pretrain demo

# Vision: SimCLR on scikit-learn's digits (one process, ~3 min on 2 cores), then a linear probe with 10% of the labels
# against raw pixels and a random-init backbone. All six methods: .venv/bin/python bench/digits.py
.PHONY: demo-vision
demo-vision: $(STAMP)
	$(BIN)/python bench/digits.py --methods simclr

# Image-text: CLIP on scikit-learn's digits as image-caption pairs (one process, a few minutes on 2 cores), then
# zero-shot accuracy with unseen prompts, retrieval recall and a 10%-label probe. SigLIP too: bench/clip_digits.py
.PHONY: demo-clip
demo-clip: $(STAMP)
	$(BIN)/python bench/clip_digits.py --losses clip

# Speech: wav2vec 2.0 on spoken digits that espeak-ng says in eight English accents (one process, ~15 min on 2 cores),
# then a 10%-label probe against MFCC features and a random-init encoder. HuBERT too: bench/spoken_digits.py
.PHONY: demo-audio
demo-audio: $(STAMP) system-deps
	$(BIN)/python bench/spoken_digits.py --methods wav2vec2

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
