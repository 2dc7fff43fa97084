#!/usr/bin/env bash
# The GPU checks of issue #10 in one command, for a machine with a GPU and a PyTorch (with timm,
# pandas, scikit-learn, matplotlib) but no internet, such as the device machines lent to some
# development sessions. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh [PART] [OUT_DIR]
#
# PART: tests (the CUDA tests), stages (every network of notebooks 04-06 in the smoke profile),
# bench (the pipeline-vs-bare benchmark) or all (the default). A device command may run 10
# minutes at most: run the parts as separate commands, each meant to stay under 8 (the
# benchmark prints every figure as soon as it is measured, so a cut run keeps what it measured).
#
# Packages the machine lacks travel as wheels in .whl/ (git-ignored), made on a machine with the
# package registry (pure-Python wheels; grad-cam has no wheel on PyPI, so pip builds one):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl segmentation-models-pytorch==0.6.0 \
#       ttach==0.0.3 iterative-stratification==0.1.9 timm==1.0.31 opencv-python-headless \
#       pytest pluggy iniconfig
#   python3 -m pip wheel --no-deps -w .whl grad-cam==1.5.7
# (the versions of requirements.lock). It then runs the CUDA tests (the smoke stages on the GPU;
# CUDA CAMs against pytorch-grad-cam within 1e-3 in fp32), every network of notebooks 04-06 in the
# smoke profile (cam2mask train --stages) and the pipeline-vs-bare benchmark at the paper's shapes,
# and writes the logs to OUT_DIR (default: gpu_check/).
set -o pipefail
part=${1:-all}
case $part in tests|stages|bench|all) ;; *) echo "PART must be tests, stages, bench or all, got '$part'" >&2; exit 2;; esac
out=${2:-gpu_check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cam2mask_site .whl/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/cam2mask_site${PYTHONPATH:+:$PYTHONPATH}  # the repo first: a wheel brings a "tests"
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/device.txt"
tests=0 stages=0 bench=0
if [[ $part == tests || $part == all ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
    tests=$?
fi
if [[ $part == stages || $part == all ]]; then
    python3 -m cam2mask_lib train --profile smoke --stages classifier segmentation grid \
        --artifacts-dir /tmp/cam2mask_gpu_smoke --no-progress 2>&1 | tail -4 | tee "$out/train_stages.log"
    stages=$?
fi
if [[ $part == bench || $part == all ]]; then
    # BENCH_ARGS: other shapes (e.g. "--size 128 800 --images 96" for a quick run)
    python3 benchmarks/gpu_pipeline.py ${BENCH_ARGS:---encoder efficientnet_b0 --size 256 1600 \
        --images 512 --batch 64 --seg-batch 16 --workers 8} 2>&1 | tee "$out/gpu_pipeline.log"
    bench=$?
fi
echo "part $part: test_cuda exit $tests, train --stages exit $stages, gpu_pipeline exit $bench"
exit $(( tests || stages || bench ))
