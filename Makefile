# Everything a fresh machine needs. torch is pinned to the CPU build that lies on this machine;
# an unpinned torch would pull gigabytes of CUDA packages.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
DEMO_DATA = data/demo
DEMO_RUN = runs/demo
DEMO_STEPS ?= 1200

.PHONY: install install-test demo test clean-demo

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .

install-test: install
	$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) data/fetch_demo.py --out $(DEMO_DATA)/raw
	[ -f $(DEMO_DATA)/prepared/meta.json ] || $(PYTHON) -m pretrain.prepare input=$(DEMO_DATA)/raw out=$(DEMO_DATA)/prepared workers=2
	deepspeed --num_gpus 2 --module pretrain.train stage=structbert model=toy \
		data.dir=$(DEMO_DATA)/prepared run.dir=$(DEMO_RUN)/structbert train.max_steps=$(DEMO_STEPS) \
		data.seq_len=64 train.lr=1e-3 train.log_every=20 train.eval_every=200 train.save_every=600
	$(PYTHON) -m pretrain.summary run.dir=$(DEMO_RUN)/structbert

test: install-test
	$(PYTHON) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO_RUN)
