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

.PHONY: venv lint study study-dry-run smoke bovw vlad dsi dsi-multitask ablations dense dsi-dense-init dsi-dense-init-sameclass tune-dense-init tune-patch8 dsi-patch8 dsi-patch8-semantic pretrain scale scale-all scale-latency scale-gpu incremental test test-fast bench bench-beam gpu-run notebooks lab demo-shot clean-cache

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

## the main job: every notebook of the study, in order, for PROFILE (smoke | cpu | paper-cpu | paper) -> reports/$(PROFILE)/
## (paper-cpu: Table 1 at 160 px on 2 cores, 2.2 hours from nothing; a rerun resumes where a stopped one stopped)
study: venv
	$(BIN)/vitdsi study --profile $(PROFILE)

## PROFILE's grid end to end in minutes: one epoch per phase, a small model, N / 16 and 60 images per class
## -> reports/$(PROFILE)-dry-run/ (numbers that mean nothing; see docs/study_runner.md, "The dry run")
study-dry-run: venv
	OMP_NUM_THREADS=1 $(BIN)/vitdsi study --profile $(PROFILE) --dry-run

smoke: venv
	$(BIN)/vitdsi study --profile smoke

# The study targets run recipes: recipes/<target>.yaml holds the settings, the output and the model folders
# (`vitdsi recipes` lists them; `vitdsi run recipes/<name>.yaml --dry-run` prints every setting).

## BoVW at 160 px, N = 512/1024/2048, 3 seeds, with the RootSIFT/tf-idf and K = 1000 checks, then VLAD at 64 px -> reports/bovw/
bovw: venv
	$(BIN)/vitdsi run recipes/bovw.yaml
	$(MAKE) vlad

## VLAD (K = 16/32/64, power- and intra-normalisation, RootSIFT) beside plain BoVW at 64 px -> reports/bovw/vlad_imagenette_64px.md
vlad: venv
	$(BIN)/vitdsi run recipes/vlad.yaml

## ViT DSI zero-shot and fine-tuned at 64 px on CPU (N = 512, 1024, 2048, both ID schemes) -> reports/dsi/
dsi: venv
	$(BIN)/vitdsi run recipes/dsi.yaml

## the multi-task DSI variant (indexing examples kept in every fine-tuning epoch) beside the models of `make dsi`
dsi-multitask: venv
	$(BIN)/vitdsi run recipes/dsi-multitask.yaml

## DSI ablations at 64 px, N = 512, one factor at a time (positions, patch, dropout, indexed share, mix ratio,
## fine-tuning options), short budgets; the default variant reuses the models of `make dsi` -> reports/ablations/
## ABLATE_FACTORS and ABLATE_LEVELS (FACTOR=LEVEL[,LEVEL...], space-separated; empty: every level) pick the grid
ABLATE_FACTORS ?= pos patch dropout index-share mix options
ABLATE_LEVELS  ?= patch=32
comma := ,
space := $(subst ,, )
ablations: venv
	$(BIN)/vitdsi run recipes/ablations.yaml --set 'factors=[$(subst $(space),$(comma) ,$(strip $(ABLATE_FACTORS)))]' \
	  --set 'levels={$(subst ~, ,$(subst $(space),$(comma)~,$(foreach l,$(ABLATE_LEVELS),$(subst =,:~[,$(l))])))}'

## the dense baseline (contrastive ViT + FAISS) and re-ranking at 64 px on CPU, N = 512/1024 -> reports/dense/
## (re-ranks the DSI models that `make dsi` left in data/runs/dsi, where there are any)
dense: venv
	$(BIN)/vitdsi run recipes/dense.yaml

## DSI started from the dense encoder and trained multi-task, beside BoVW and dense search; targets 3 and 4
## (trains the dense encoders first where `make dense` has not: data/runs/dense) -> reports/dsi_dense_init/
dsi-dense-init: venv
	$(BIN)/vitdsi run recipes/dsi-dense-init.yaml

## the same with same-class targets in the multi-task phase, the setting chosen on the val queries at N = 1024
## (`make tune-dense-init` -> reports/dsi_dense_init/tuning_val_N1024.md) -> reports/dsi_dense_init_sameclass/
dsi-dense-init-sameclass: venv
	$(BIN)/vitdsi run recipes/dsi-dense-init-sameclass.yaml

## multi-task settings of the dense-init DSI scored on the val queries (needs `make dsi-dense-init`) -> reports/dsi_dense_init/
tune-dense-init: venv
	$(BIN)/python scripts/tune_dense_init.py --n 1024 --scheme clustered

## patch 8 against patch 16 at N = 512: multi-task settings scored on the val queries, from the zero-shot models of
## `make dsi` and `make ablations ABLATE_FACTORS=patch ABLATE_LEVELS=patch=8` -> reports/dsi_patch8/tuning_val_N512_*.md
tune-patch8: venv
	$(BIN)/python scripts/tune_dense_init.py --n 512 --variants base same-class --tag patch16 --set out_dir=reports/dsi_patch8 \
	  --model data/runs/dsi/imagenette-64px-N512-clustered-seed0/zero_shot.pt
	$(BIN)/python scripts/tune_dense_init.py --n 512 --variants base same-class --tag patch8 --set out_dir=reports/dsi_patch8 \
	  --model data/runs/dsi/imagenette-64px-N512-clustered-seed0/ablations/patch_size8/zero_shot.pt

## the recipe chosen there (recipes/dsi-patch8.yaml): patch 8 (8 x 8 tokens at 64 px), from scratch, multi-task with
## same-class targets, beside BoVW averaged over 5 vocabularies (the models go to data/runs/dsi_patch8), on every N
## with clustered, random and atomic IDs; targets 3 and 4 -> reports/dsi_patch8/
dsi-patch8: venv
	$(BIN)/vitdsi run recipes/dsi-patch8.yaml

## semantic and RQ IDs (k-means codes of the indexed images' BoVW histograms) with the same recipe, N = 512 and 1024,
## beside its clustered rows (loaded from data/runs/dsi_patch8 when `make dsi-patch8` ran) -> reports/dsi_patch8/semantic_rq/
dsi-patch8-semantic: venv
	$(BIN)/vitdsi run recipes/dsi-patch8-semantic.yaml

## self-supervised pretraining of the DSI encoder on the images outside the databases, then the DSI from it
## (N = 512, clustered IDs, the settings of `make dsi`), beside the from-scratch rows of `make dsi` -> reports/pretrain/
pretrain: venv
	$(BIN)/vitdsi run recipes/pretrain.yaml

## scale: latency per query against N up to all 13,394 images (DSI beam search, BoVW, dense FAISS) and IA@1 of a
## DSI trained on N = 512 and 1024 images, 64 px, on this CPU -> reports/scale/ (a rerun keeps the latency table)
scale: venv
	$(BIN)/vitdsi run recipes/scale.yaml

## target 5's IA@1 on this CPU: a DSI trained to memorise all 13,394 images (random IDs, 64 px, batch 128, stopped by the
## cheap teacher-forced check at 0.98, then IA@1 by beam search once), beside the latency table of `make scale`
## -> reports/scale_all/ (hours on 2 cores; resumes from data/runs/scale where it stopped)
scale-all: venv
	mkdir -p reports/scale_all
	test -f reports/scale_all/scale_latency.csv || cp reports/scale/scale_latency.csv reports/scale_all/
	$(BIN)/vitdsi run recipes/scale-all.yaml

## the latency half of the scale study again, without training: top-10 and top-100 against N for DSI beam search,
## BoVW and dense search on one thread, at 64 px (beside the IA@1 tables of reports/scale and reports/scale_all) and
## at 160 px (reports/scale_160); about 25 min on 2 idle cores. Run 2 redraws reports/scale_all with the table of run 1
scale-latency: venv
	OMP_NUM_THREADS=1 $(BIN)/vitdsi run recipes/scale-latency.yaml --run 1
	mkdir -p reports/scale_all
	cp reports/scale/scale_latency.csv reports/scale_all/
	OMP_NUM_THREADS=1 $(BIN)/vitdsi run recipes/scale-latency.yaml --run 2 --run 3

## the full scale study on a GPU: the paper's model at 160 px trained on every N up to all images (hours on one H100)
scale-gpu: venv
	$(BIN)/vitdsi run recipes/scale-gpu.yaml

## incremental indexing: 20% new images added to a trained DSI (fine-tuning, replay 0/1/4) vs retraining, 64 px,
## N = 1024 (256 indexed) -> reports/incremental/
incremental: venv
	$(BIN)/vitdsi run recipes/incremental.yaml

## lint: ruff's checks and format, and the import contracts of pyproject.toml (layers, no cycles)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

## the test suite, after lint (what CI runs): the test files spread over every core (pytest-xdist; a file stays on
## one worker, so its module fixtures are built once; the longest files first, see tests/conftest.py), one torch
## thread per worker
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

## the suite without the notebook runs
test-fast: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -m "not notebook"

## the notebooks' .ipynb beside their py:percent sources (git-ignored; notebooks/jupytext.toml pairs them): jupytext
## --sync writes each .ipynb from its .py, or, where the .ipynb was edited later, that edit into the .py
notebooks: venv
	$(BIN)/jupytext --sync notebooks/[0-9][0-9]_*.py

## JupyterLab with the project's environment as the kernel; opening and saving either file of a pair writes both
## (as root, in a container, Jupyter refuses to start without --allow-root, so the target passes it there)
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
lab: notebooks
	$(BIN)/python -m ipykernel install --sys-prefix --name vitdsi --display-name "vitdsi (.venv)"
	$(BIN)/jupyter lab $(LAB_ARGS) notebooks/

## benchmarks: timings written to reports/benchmarks/
bench: venv bench-beam
	$(BIN)/python benchmarks/bench_bovw.py
	$(BIN)/python benchmarks/bench_dsi.py --image-size 64
	$(BIN)/python benchmarks/bench_dsi.py --image-size 160

## beam search before and after issue 17, side by side (one thread; about 6 min on an idle core), and its
## exactness on trained smoke- and cpu-profile models (about 5 min) -> reports/benchmarks/beam_*
bench-beam: venv
	$(BIN)/python benchmarks/bench_beam.py --device cpu --threads 1 --k 10 100
	$(BIN)/python benchmarks/check_beam_exactness.py --threads 1

## the GPU check: training throughput of the paper's model (fp32, bf16, bf16 + torch.compile), beam-search latency
## against N and one cell of the paper's grid end to end, in under 10 min on one H200 -> reports/gpu/
## (GPU_RUN_ARGS=--dry-run: every step on the CPU with tiny sizes, in under a minute -> reports/gpu-dry-run/)
GPU_RUN_ARGS ?=
gpu-run: venv
	$(BIN)/python benchmarks/gpu_run.py $(GPU_RUN_ARGS)

## the demo in headless Chromium: pick a query, run it, screenshot -> reports/demo/demo_$(DEMO_PROFILE).png
## (runs the DEMO_PROFILE study first when its models are missing; needs `apt-get install chromium`)
demo-shot: venv
	$(BIN)/python scripts/demo_screenshot.py --profile $(DEMO_PROFILE)

clean-cache:
	rm -rf data/cache
