# Tasks of the vitdsi study. Every target creates the virtual environment first if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# The images: VITDSI_IMAGENETTE_DIR if you set it, else the shared offline copy beside the
# project when there is one, else torchvision downloads imagenette2-160 into data/raw/.
SHARED_IMAGENETTE := $(wildcard $(abspath ../shared/data/imagenette-224))
ifeq ($(origin VITDSI_IMAGENETTE_DIR), undefined)
  ifneq ($(SHARED_IMAGENETTE),)
    export VITDSI_IMAGENETTE_DIR := $(SHARED_IMAGENETTE)
  endif
endif

PROFILE ?= cpu
DEMO_PROFILE ?= smoke

.PHONY: venv study smoke bovw dsi dsi-multitask dense scale scale-gpu incremental test test-fast bench lab demo-shot clean-cache

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

## the main job: every notebook of the study, in order, for PROFILE (smoke | cpu | paper) -> reports/$(PROFILE)/
study: venv
	$(BIN)/vitdsi study --profile $(PROFILE)

smoke: venv
	$(BIN)/vitdsi study --profile smoke

## BoVW at 160 px, N = 512/1024/2048, 3 seeds, with the RootSIFT/tf-idf and K = 1000 checks -> reports/bovw/
bovw: venv
	$(BIN)/vitdsi bovw --size 160 --n 512 1024 2048 --seeds 0 1 2
	$(BIN)/vitdsi bovw --size 160 --n 512 1024 2048 --seeds 0 1 2 --rootsift --tfidf
	$(BIN)/vitdsi bovw --size 160 --n 512 1024 2048 --rootsift --tfidf --words 1000
	$(BIN)/vitdsi bovw --size 64 --n 512 1024 2048

## ViT DSI zero-shot and fine-tuned at 64 px on CPU (N = 512, 1024, 2048, both ID schemes) -> reports/dsi/
dsi: venv
	$(BIN)/vitdsi dsi --size 64 --n 512 1024 2048 --lr 1e-3 --warmup-steps 100 --target-accuracy 0.99 \
	  --index-epochs 400 --retrieval-epochs 10 --max-pairs-per-query 5 --out reports/dsi --runs data/runs/dsi

## the multi-task DSI variant (indexing examples kept in every fine-tuning epoch) beside the models of `make dsi`
dsi-multitask: venv
	$(BIN)/vitdsi dsi --size 64 --n 512 1024 2048 --lr 1e-3 --warmup-steps 100 --target-accuracy 0.99 \
	  --index-epochs 400 --retrieval-epochs 10 --max-pairs-per-query 5 --out reports/dsi --runs data/runs/dsi \
	  --multitask --mix-ratio 2 --multitask-epochs 30

## the dense baseline (contrastive ViT + FAISS) and re-ranking at 64 px on CPU, N = 512/1024 -> reports/dense/
## (re-ranks the DSI models that `make dsi` left in data/runs/dsi, where there are any)
dense: venv
	$(BIN)/vitdsi dense --size 64 --n 512 1024 --epochs 90 --lr 5e-4 --batch-size 64 --schemes clustered random \
	  --dsi-runs data/runs/dsi --dsi-table reports/dsi/dsi_imagenette_64px.csv --out reports/dense --runs data/runs/dense

## scale: latency per query against N up to all 13,394 images (DSI beam search, BoVW, dense FAISS) and IA@1 of a
## DSI trained on N = 512 and 1024 images, 64 px, on this CPU -> reports/scale/ (a rerun keeps the latency table)
scale: venv
	$(BIN)/vitdsi scale --size 64 --n 512 1024 2048 4096 8192 0 --ia-n 512 1024 --index-epochs 100 \
	  --queries 64 --query-batch 64 --repeats 3 --reuse-latency --out reports/scale --runs data/runs/scale

## the full scale study on a GPU: the paper's model at 160 px trained on every N up to all images (hours on one H100)
scale-gpu: venv
	$(BIN)/vitdsi scale --size 160 --n 512 1024 2048 4096 8192 0 --ia-n 512 1024 2048 4096 8192 0 --index-epochs 1000 \
	  --device cuda --amp --compile --queries 256 --query-batch 256 --repeats 5 --out reports/scale-gpu --runs data/runs/scale-gpu

## incremental indexing: 20% new images added to a trained DSI (fine-tuning, replay 0/1/4) vs retraining, 64 px,
## N = 1024 (256 indexed) -> reports/incremental/
incremental: venv
	$(BIN)/vitdsi incremental --size 64 --n 1024 --new-fraction 0.2 --replay-ratios 0 1 4 --finetune-epochs 40 \
	  --out reports/incremental --runs data/runs/incremental

## the test suite (what CI runs)
test: venv
	$(BIN)/python -m pytest -q

## the suite without the notebook runs
test-fast: venv
	$(BIN)/python -m pytest -q -m "not notebook"

## JupyterLab with the project's environment as the kernel
lab: venv
	$(BIN)/python -m ipykernel install --sys-prefix --name vitdsi --display-name "vitdsi (.venv)"
	$(BIN)/jupyter lab notebooks/

## benchmarks: timings written to reports/benchmarks/
bench: venv
	$(BIN)/python benchmarks/bench_bovw.py
	$(BIN)/python benchmarks/bench_dsi.py --image-size 64
	$(BIN)/python benchmarks/bench_dsi.py --image-size 160

## the demo in headless Chromium: pick a query, run it, screenshot -> reports/demo/demo_$(DEMO_PROFILE).png
## (runs the DEMO_PROFILE study first when its models are missing; needs `apt-get install chromium`)
demo-shot: venv
	$(BIN)/python scripts/demo_screenshot.py --profile $(DEMO_PROFILE)

clean-cache:
	rm -rf data/cache
