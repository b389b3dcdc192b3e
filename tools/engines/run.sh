#!/usr/bin/env bash
# `make test-engines`: tests/engines/ against the real engines, each in its own cached virtualenv.
# VLLM_VERSION / SGLANG_VERSION pick the versions (empty skips that engine); extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
status=0
for spec in "vllm:${VLLM_VERSION-0.33.0}" "sglang:${SGLANG_VERSION-0.5.23}"; do
    engine=${spec%%:*} version=${spec#*:}
    [ -n "$version" ] || continue
    py=$(bash tools/engines/engine_env.sh "$engine" "$version" | tail -n 1)
    echo "== $engine $version: $py"
    BANPICK_ENGINE_UNDER_TEST="$engine" "$py" tools/engines/run_pytest.py -p no:cacheprovider "tests/engines/test_$engine.py" "$@" || status=1
done
exit $status
