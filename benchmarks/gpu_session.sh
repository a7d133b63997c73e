#!/usr/bin/env bash
# The steps run on the GPU machine for docs/benchmarks.md, one per call of the device tool.
# vLLM is carried there and unpacked first (three calls, see docs/benchmarks.md); then, from the
# repository root on that machine:
#
#   bash benchmarks/gpu_session.sh models      # random-weight 0.5B / 1.5B shapes, real tokenizer
#   bash benchmarks/gpu_session.sh gguf-part   # one carried chunk of the demo GGUF (repeat)
#   bash benchmarks/gpu_session.sh convert     # join, sha256-check, convert (in the background)
#   bash benchmarks/gpu_session.sh tests       # pytest -m gpu
#   bash benchmarks/gpu_session.sh bench       # a, b, d, e and the profile, both shapes
#   bash benchmarks/gpu_session.sh load        # c: %qwen_load against a bare vllm.LLM
#   bash benchmarks/gpu_session.sh decode SHAPE [JSON_OPTION]  # a only, 10 runs (second session)
#   bash benchmarks/gpu_session.sh load-shape SHAPE MODES      # c on another shape, per mode
#   bash benchmarks/gpu_session.sh tests-random  # pytest -m gpu without the real-model test
#   bash benchmarks/gpu_session.sh start [LABEL]   # bench_start, the first vLLM process of a fresh
#                                                 # machine first (GPU 0); then converts the demo
#   bash benchmarks/gpu_session.sh server-tp2      # bench_server on a managed TP=2 server (2 GPUs)
#   bash benchmarks/gpu_session.sh demo-tp2        # the demo model through a TP=2 server (2 GPUs)
#
# .device/tokenizer holds the demo model's tokenizer files and .device/gguf/NN the GGUF chunks
# (split -b 55M); both are carried, not committed.
set -euo pipefail
# Our GPU machines have no package registry: vLLM is unpacked under /tmp/site first. Elsewhere,
# pip install -e '.[gpu,test]' and skip this.
if [[ -f /tmp/site/env.sh ]]; then source /tmp/site/env.sh; fi
tokenizer=${QWEN_MAGIC_TOKENIZER:-.device/tokenizer}  # a folder with the demo's tokenizer files
export PYTHONPATH=$PWD:$PYTHONPATH
export QWEN_MAGIC_HOME=/tmp/qwen-magic-home
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/models /tmp/gguf
demo_sha256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

case "${1:?step}" in
models)
    for shape in 0.5b 1.5b; do
        python3 benchmarks/make_random_model.py --shape "$shape" --tokenizer "$tokenizer" \
            --out "/tmp/models/random-$shape" --device cuda
    done
    ;;
gguf-part)
    cp .device/gguf/*/* /tmp/gguf/
    ls -la /tmp/gguf
    ;;
convert)
    cat /tmp/gguf/gguf_chunk.* > /tmp/demo.gguf
    echo "$demo_sha256  /tmp/demo.gguf" | sha256sum -c -
    setsid nohup python3 -c "
from pathlib import Path
from qwen_magic import models
from qwen_magic._gguf import convert_gguf_to_hf
Path('/tmp/models/demo').mkdir(parents=True, exist_ok=True)
convert_gguf_to_hf(Path('/tmp/demo.gguf'), Path('/tmp/models/demo'),
                   eos_token_ids=models.QWEN_EOS_TOKEN_IDS, sampling_defaults=models.QWEN25_SAMPLING)
Path('/tmp/models/demo/.complete').write_text('ok')
" > /tmp/convert.log 2>&1 < /dev/null &
    echo "converting in the background: /tmp/convert.log"
    ;;
tests)
    export QWEN_MAGIC_GPU_MODEL=/tmp/models/random-0.5b QWEN_MAGIC_GPU_REAL_MODEL=/tmp/models/demo
    for _ in $(seq 180); do [[ -f /tmp/models/demo/.complete ]] && break; sleep 1; done
    tail -3 /tmp/convert.log
    python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
    ;;
bench)
    for shape in 0.5b 1.5b; do
        python3 benchmarks/bench_gpu.py --model "/tmp/models/random-$shape" --label "gpu-$shape" --repeat 5 \
            --hf --engine-option '["gpu_memory_utilization", 0.5]' \
            --engine-option '["max_model_len", 8192]' 2>&1 | tee "$out/bench-$shape.log"
        cp "benchmarks/results/gpu-$shape.json" "$out/"
    done
    ;;
load)
    python3 benchmarks/bench_load.py --model /tmp/models/random-0.5b --label gpu-0.5b --warm-repeat 1 \
        2>&1 | tee "$out/load.log"
    cp benchmarks/results/load-gpu-0.5b.json "$out/"
    ;;
decode)
    shape=${2:?shape}
    label="gpu-$shape-decode${3:+-$(echo "$3" | tr -dc 'a-z0-9_')}"
    python3 benchmarks/bench_gpu.py --model "/tmp/models/random-$shape" --label "$label" \
        --repeat 10 --parts a --engine-option '["gpu_memory_utilization", 0.5]' \
        --engine-option '["max_model_len", 8192]' ${3:+--engine-option "$3"} 2>&1 \
        | grep -v "^INFO\|^WARNING\|^(EngineCore" | tee "$out/$label.log"
    cp "benchmarks/results/$label.json" "$out/"
    ;;
load-shape)
    python3 benchmarks/bench_load.py --model "/tmp/models/random-${2:?shape}" --label "gpu-$2-$3" \
        --warm-repeat 1 --modes "${3:?modes}" 2>&1 | tee "$out/load-$2-$3.log"
    cp "benchmarks/results/load-gpu-$2-$3.json" "$out/"
    ;;
start)
    # Run in the background right after vLLM is unpacked (nothing has run vLLM yet). The staged
    # copy and the image's own packages (torch, transformers, ...) have no bytecode, and the image
    # sets PYTHONDONTWRITEBYTECODE; compile both as pip install does, so the runs measure vLLM,
    # not Python compiling its source in every process (10.8 s of import against 18.3 s with
    # vLLM's bytecode only, docs/benchmarks.md section g, fourth round).
    label=${2:-gpu-h100}
    export CUDA_VISIBLE_DEVICES=0
    begin=$SECONDS
    purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    python3 -m compileall -q -j 0 /tmp/site "$purelib" > /dev/null 2>&1 || true
    echo "compileall $((SECONDS - begin)) s" > "$out/start.log"
    python3 benchmarks/bench_start.py --model /tmp/models/random-0.5b \
        --runs qwen-magic,qwen-magic,qwen-magic/vllm-tokenizer,qwen-magic,qwen-magic/vllm-tokenizer \
        --out "$out/start-$label-fresh.json" >> "$out/start.log" 2>&1
    python3 benchmarks/bench_start.py --model /tmp/models/random-0.5b --runs qwen-magic \
        --reading-s 30 --out "$out/start-$label-reading30.json" >> "$out/start.log" 2>&1
    if [[ -f /tmp/gguf/gguf_chunk.08 ]]; then bash "$0" convert >> "$out/start.log" 2>&1; fi
    python3 benchmarks/bench_start.py --model /tmp/models/random-0.5b \
        --runs vllm-default,transformers --out "$out/start-$label-others.json" >> "$out/start.log" 2>&1
    # Which Triton kernels a load compiles, and when (the cache holds one folder per kernel).
    find ~/.triton/cache -name "*.json" ! -name "__grp__*" -printf "%TT %s %f\n" | sort \
        > "$out/triton-kernels.txt" 2>&1 || true
    echo "start: done" >> "$out/start.log"
    ;;
server-tp2)
    python3 benchmarks/bench_server.py --model /tmp/models/random-0.5b --label gpu-0.5b-tp2 --tp 2 \
        --repeat 8 2>&1 | grep -v "^INFO\|^WARNING\|^(" | tail -20 | tee "$out/server-tp2.log"
    cp benchmarks/results/server-gpu-0.5b-tp2.json "$out/"
    ;;
demo-tp2)
    for _ in $(seq 180); do [[ -f /tmp/models/demo/.complete ]] && break; sleep 1; done
    tail -2 /tmp/convert.log
    QWEN_MAGIC_GPU_REAL_MODEL=/tmp/models/demo python3 -m pytest -m gpu tests/test_gpu.py -v -s \
        -p no:cacheprovider -k "demo_model_answers_through" 2>&1 | tail -15 | tee "$out/demo-tp2.log"
    ;;
tests-random)
    export QWEN_MAGIC_GPU_MODEL=/tmp/models/random-0.5b
    python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -k "not real_model" 2>&1 \
        | tee "$out/gpu-tests-random.log"
    ;;
*)
    echo "unknown step $1" >&2
    exit 2
    ;;
esac
