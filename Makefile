# edgec developer commands. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Converters must never reach the network at run time; tests and demo run offline.
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_USE_LEGACY_KERAS  := 1

DEMO_MODEL  ?= models/mobilenetv2.onnx
DEMO_TARGET ?= tflite-arm
EMU_DIR     ?= .emu

# make deploy: build (which verifies) → profile on DEVICE → artifact + reports into DEPLOY_DIR.
MODEL      ?= $(DEMO_MODEL)
TARGET     ?= tflite-x86
DEVICE     ?= local
DEPLOY_DIR ?= deploy
DEPLOY_BUILD := build/deploy/$(basename $(notdir $(MODEL)))-$(TARGET)

.PHONY: setup demo test test-devices arm-emulator bench zoo zoo-check deploy clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

demo: setup
	$(BIN)/edgec build $(DEMO_MODEL) --target $(DEMO_TARGET) -o build/demo \
		--inputs models/data/digits_eval_nchw.npz

# CI (CI=true) sets up the emulated arm64 devices and sshd first, so their tests run there
# instead of skipping (about 1.5 min from scratch).
test: setup $(if $(filter true 1,$(CI)),test-devices)
	$(BIN)/python -m pytest -q

# The emulated arm64 devices of targets/devices.toml (emulated-a53, emulated-a76) under $(EMU_DIR)/:
# qemu-user, an arm64 Debian root, the pinned runtimes' aarch64 wheels, an instruction-count
# plugin. Installs missing Debian packages with apt-get (as root). About a minute the first time.
arm-emulator: setup
	bash edgec/profile/emulator_setup.sh $(EMU_DIR) $(BIN)/python constraints.txt

# What the device tests need: the emulator and openssh-server (the SSH tests start their own
# sshd on 127.0.0.1). Without apt-get or root it says what is missing, and those tests skip.
test-devices: setup
	bash edgec/profile/emulator_setup.sh --optional --sshd $(EMU_DIR) $(BIN)/python constraints.txt

# Installs the `compare` extra (onnx2tf) so the benchmark can measure edgec against it.
bench: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,compare]'
	$(BIN)/python -m edgec.bench -o build/bench.json

# Regenerates the model zoo (trains on scikit-learn's digits, exports with torch / tf2onnx).
zoo: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,zoo]'
	$(BIN)/python models/make_zoo.py
	$(BIN)/python models/field.py

zoo-check: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,zoo]'
	$(BIN)/python models/make_zoo.py --check

deploy: setup
	$(BIN)/edgec build $(MODEL) --target $(TARGET) -o $(DEPLOY_BUILD) --profile $(DEVICE)
	mkdir -p $(DEPLOY_DIR)
	cp $(DEPLOY_BUILD)/* $(DEPLOY_DIR)/
	@echo "Deployed to $(DEPLOY_DIR)/: $$(ls $(DEPLOY_DIR) | tr '\n' ' ')"

clean:
	rm -rf build .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
