"""An lm-evaluation-harness model with a routing profile applied: run any harness task with Ban&Pick.

Needs `pip install "lm-eval[hf]"` (optional; nothing else in banpick imports it).

    from banpick_cli.evaluation.lm_eval import BanpickLM
    import lm_eval
    lm = BanpickLM(pretrained="Qwen/Qwen3-30B-A3B", profile="qwen3.safetensors", method="banpick", domain="math")
    results = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"])
    lm.routing.stats().avg_experts_overall         # Avg-TopK over everything the harness ran

From the shell, `python -m banpick_cli.evaluation.lm_eval` is the harness's own CLI with the model
registered as `banpick`:

    python -m banpick_cli.evaluation.lm_eval run --model banpick \\
        --model_args pretrained=demo,profile=demo.safetensors,method=ban,lam=0.7 --tasks arc_easy

Model args: `pretrained` (a model path, hub id or `demo`), `profile`, `method`, `domain`, `device`,
`dtype`; any hyperparameter the method accepts (`lam`, `k_min`, `strategy`, `range_factor`, `tau`,
...) goes to the routing; everything else to the harness's HFLM (`batch_size`, `max_length`, ...).
"""

from __future__ import annotations

from typing import Any

from banpick_cli.errors import BadSetting

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError:  # the harness is optional
    HFLM = None  # type: ignore[assignment,misc]
    register_model = None  # type: ignore[assignment]

INSTALL_HINT = "the lm-evaluation-harness adapter needs the harness: pip install 'lm-eval[hf]'"


def available() -> bool:
    """Returns whether lm-evaluation-harness is installed."""
    return HFLM is not None


def split_args(method: str, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (routing hyperparameters of `method`, the rest for HFLM) from the harness's model args."""
    from banpick_cli.runtime.methods import METHODS, allowed_params

    if method not in METHODS:
        raise BadSetting(f"method must be one of {', '.join(METHODS)}, got '{method}'")
    routing_names = set(allowed_params(method))
    routing = {k: v for k, v in args.items() if k in routing_names}
    return routing, {k: v for k, v in args.items() if k not in routing_names}


if HFLM is not None:

    @register_model("banpick")
    class BanpickLM(HFLM):
        """The harness's HF model with `banpick_cli.runtime.apply` installed for its whole life."""

        def __init__(self, pretrained: str = "demo", profile: str | None = None, method: str = "baseline",
                     domain: str | None = None, device: str = "auto", dtype: str = "auto", **kwargs: Any):
            from banpick_cli.models.loading import load_model
            from banpick_cli.runtime import apply
            from banpick_cli.runtime.methods import get_method

            routing_args, hflm_args = split_args(method, kwargs)
            loaded = load_model(str(pretrained), device=device or "auto", dtype=dtype or "auto")
            hflm_args.setdefault("batch_size", 1)
            super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **hflm_args)
            self.loaded = loaded
            if profile is None and get_method(method).rules is not None:
                # dynamic / des / odp / rice read no profile tensor; the plan still checks shapes on one
                from banpick_cli.profile.format import new_profile

                profile = new_profile(loaded.identity, loaded.fingerprint)
            self.routing = apply(loaded, profile, method, domain, **routing_args)

        def close(self) -> None:
            """Removes the routing hooks (the model returns to its own routing)."""
            self.routing.remove()

else:
    BanpickLM = None  # type: ignore[assignment,misc]


def main() -> None:
    """The harness's command line, with `--model banpick` registered."""
    if not available():
        raise SystemExit(INSTALL_HINT)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
