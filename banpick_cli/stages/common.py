"""The skeleton every stage shares: its calibration text, the model, the profile it updates, a resumable
loop, and the provenance it stores.

    text settings (TextSettings) -> check_model -> load_domain_text -> load the model -> open_for_update
    -> with resumable(...): the pass, saving to its sidecar -> store(): under the profile's lock, re-read,
       set the stage's own entries and provenance(), write atomically
"""

from __future__ import annotations

import copy
import shlex
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypedDict, Unpack

from banpick_cli.checks import at_least, number
from banpick_cli.errors import BadSetting, Interrupted, ProfileError
from banpick_cli.routing import BETA, K_MIN, LAM
from banpick_cli.models.loading import LoadedModel
from banpick_cli.profile.stats import CandidateRule
from banpick_cli.profile.format import RoutingProfile, check_fingerprint, new_profile, read_metadata, read_profile


@dataclass(frozen=True)
class TextSettings:
    """The calibration text a stage runs on (profile, kl-scan, layer-sensitivity); each stage's settings extend it."""

    domain: str | None = None  # a domain name or .toml file; None only where the stage can infer it
    data: str | None = None  # a local file, hub dataset id or "embedded"; None: the domain's own sources
    text_field: str | None = None
    samples: int = 128
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        at_least((("--samples", self.samples, 1), ("--seq-len", self.seq_len, 2), ("--batch-size", self.batch_size, 1),
                  ("--seed", self.seed, 0)))


class CandidateKnobs:
    """The candidate rule's two flags (--candidate-ratio, --candidate-top), shared by profile and import-usage;
    validated after the settings' own checks."""

    candidate_ratio: float
    candidate_top: int

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.rule  # validates the candidate knobs

    @property
    def rule(self) -> CandidateRule:
        return CandidateRule(self.candidate_ratio, self.candidate_top)


def load_domain_text(settings: TextSettings, *, model: str):
    """Returns (domain, calibration text); the demo model defaults to the embedded data."""
    from banpick_cli.data import get_domain, load_calibration_text
    from banpick_cli.paths import DEMO_MODEL_NAME

    if settings.domain is None:
        raise BadSetting("--domain is required")
    domain = get_domain(settings.domain)
    text = load_calibration_text(domain, settings.data, samples=settings.samples, seed=settings.seed,
                                 text_field=settings.text_field, use_embedded=model == DEMO_MODEL_NAME)
    return domain, text


@contextmanager
def resumable(stage: str, out: Path, done: Callable[[], int], total: int | Callable[[], int],
              unit: str = "layers") -> Iterator[None]:
    """Turns Ctrl-C / SIGTERM inside the block into Interrupted (exit 3), saying what was saved where.

    `total` may be a callable, read at the interrupt (a scan knows its windows only once it runs)."""
    try:
        yield
    except KeyboardInterrupt:
        count = total() if callable(total) else total
        raise Interrupted(f"{stage} stopped: {done()} of {count} {unit} finished and saved beside {out}; "
                          "rerun the same command to resume") from None


def check_model_first(model: str, loaded) -> None:
    """Reads the model's config (no weights) before any data is fetched: a mistyped --model, an empty folder
    or a dense model is reported as such, at once, not as a dataset problem after a download."""
    if loaded is None:
        from banpick_cli.models.loading import check_model

        check_model(model)


class ModelArgs(TypedDict, total=False):
    """How a stage gets its model: `model` (a local folder, hub id or 'demo', the default) on `device` and
    `dtype` ("auto"), read layer by layer from the checkpoint when `stream`, or `loaded` already."""

    model: str
    device: str
    dtype: str
    stream: bool
    loaded: LoadedModel | None


def load_inputs(settings: TextSettings, **args: Unpack[ModelArgs]):
    """Returns (domain, calibration text, loaded model): the model's config is checked before any data is
    fetched, the text loaded, then the model (streamed when asked)."""
    from banpick_cli.models.loading import load_model
    from banpick_cli.paths import DEMO_MODEL_NAME

    model, loaded = args.get("model", DEMO_MODEL_NAME), args.get("loaded")
    device, dtype = args.get("device", "auto"), args.get("dtype", "auto")
    check_model_first(model, loaded)
    domain, text = load_domain_text(settings, model=loaded.identity.name_or_path if loaded else model)
    if loaded is None and args.get("stream", False):  # each decoder layer read from the checkpoint when it runs
        from banpick_cli.passes.streaming import load_streaming

        loaded = load_streaming(model, device=device, dtype=dtype)
    return domain, text, loaded or load_model(model, device=device, dtype=dtype)


def store(out: Path, source: RoutingProfile, loaded: LoadedModel, change: Callable[[RoutingProfile], Any], *,
          domain: str | None = None) -> RoutingProfile:
    """Writes a stage's results into the profile at `out` under its lock and returns what was written.

    The file is read again under the lock, so whatever other writers stored meanwhile (other domains,
    other stages) is kept and `change` sets only this stage's entries; a new `out` starts from `source`,
    the profile the stage read. With `domain`, refuses when that domain's usage counts in `out` changed
    since the stage read them (its results would belong to other counts).
    """
    import torch

    from banpick_cli.profile.format import update_profile

    def apply(current: RoutingProfile) -> None:
        if not current.tensors and not current.provenance:  # a new file: what the stage read, then its results
            current.tensors.update(source.tensors)
            current.settings.update(copy.deepcopy(source.settings))
            current.provenance.update(copy.deepcopy(source.provenance))
        if domain is not None:
            read, now = source.domain(domain).find("expert_counts"), current.domain(domain).find("expert_counts")
            if read is not None and (now is None or not torch.equal(read, now)):
                raise ProfileError(f"the usage counts of '{domain}' in {out} changed while this stage ran "
                                   "(another `banpick profile` wrote them); rerun this stage")
        change(current)

    return update_profile(out, apply, model=loaded.identity, fingerprint=loaded.fingerprint)[0]


def check_ban_knobs(*, k_min: int = K_MIN, lam: float = LAM, beta: float = BETA, k_base: int | None = None) -> None:
    """Raises a one-line BadSetting naming the flag unless Ban's knobs are valid: the rule every command uses
    (K_min an integer in [1, K_base], lambda finite and >= 0, beta in [0, 1]; the routing core refuses the same).
    Without k_base (before the model is known) K_min is only checked to be >= 1."""
    number("--k-min", k_min, low=1, high=k_base, integer=True)
    number("--lambda", lam, low=0)
    number("--beta", beta, low=0, high=1)


def command_line() -> str:
    """Returns the command line of this process, quoted so it can be pasted back."""
    return " ".join(shlex.quote(arg) for arg in [Path(sys.argv[0]).name, *sys.argv[1:]])


def provenance(stage: str, settings: Any, loaded: LoadedModel, **facts: Any) -> dict[str, Any]:
    """Returns the provenance record a stage stores: its settings, the run's facts, and when/how."""
    record: dict[str, Any] = {
        "stage": stage,
        "settings": asdict(settings) if is_dataclass(settings) else dict(settings),
        "device": str(loaded.device),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "command": command_line(),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    record.update(facts)
    return record


def open_for_update(path: str | Path, loaded: LoadedModel) -> RoutingProfile:
    """Returns the profile at `path` for this model, or a new one when the file does not exist.

    An existing file that is not a profile, or a profile of another model, is refused rather than
    overwritten.
    """
    target = Path(path)
    if not target.exists():
        return new_profile(loaded.identity, loaded.fingerprint)
    if target.is_dir():
        raise ProfileError(f"{target} is a directory; give a profile file path")
    read_metadata(target)
    profile = read_profile(target)
    check_fingerprint(profile, loaded.fingerprint, path=target)
    return profile
