# Every target creates .venv if it is missing and installs the project into it.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU build on this machine's disk; unpinned pip would pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,faiss]'
	touch $(STAMP)

# the synthetic world -> shards -> 2-rank DeepSpeed pretraining on CPU -> test metrics next to popularity
# -> export -> the HTTP server answers one /recommend and one /search request (query text: MiniLM vectors)
demo: $(STAMP)
	$(BIN)/python -m data_pipeline synthetic --out runs/demo/shards --overwrite --quiet
	$(BIN)/python -m data_pipeline content --shards runs/demo/shards --set semantic_ids.method=rq_kmeans --quiet
	rm -rf runs/demo/pretrain
	OMP_NUM_THREADS=1 PATH=$(abspath $(BIN)):$$PATH $(BIN)/deepspeed --num_gpus 2 --master_port $$($(BIN)/python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])') \
		--module train pretrain --config configs/pretrain/demo.yaml
	$(BIN)/python -m train export --run runs/demo/pretrain --out runs/demo/export --overwrite
	$(BIN)/python -m serve.demo --export runs/demo/export

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench-data: $(STAMP)
	$(BIN)/python bench/data_pipeline.py --raw ../shared/data/ml-1m

clean:
	rm -rf runs shards .pytest_cache
