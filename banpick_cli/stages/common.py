"""The skeleton every stage shares: its calibration text, the model, the profile it updates, a resumable
loop, and the provenance it stores.

    with lifecycle(stage, saved):    Ctrl-C / SIGTERM -> Interrupted (exit 3), saying what was saved
        settings (TextSettings ...)  -> load_inputs: the model's config, the text, the model
        open_for_update               -> the pass, saving to its sidecar (passes/resume.py)
        store(..., provenance(...))   -> under the profile's lock: re-read, refuse a same-domain race,
                                         set the stage's own entries and provenance, write atomically
"""

from __future__ import annotations

import copy
import shlex
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, TypedDict, Unpack

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
def lifecycle(stage: str, out: Path | None = None, saved: Callable[[], str | None] = lambda: None) -> Iterator[None]:
    """The one interrupt rule of every stage: Ctrl-C or SIGTERM inside the block raises Interrupted (exit 3)
    saying what was saved beside `out`: `saved()` describes it ("2 of 5 windows", see `count_saved`), or
    returns None when this run has saved nothing (no checkpoint yet, or checkpoints off), and the message
    says so."""
    from banpick_cli.interrupts import terminate_as_interrupt

    try:
        with terminate_as_interrupt():
            yield
    except KeyboardInterrupt:
        what = saved()
        if what:
            raise Interrupted(f"{stage} stopped: {what} finished and saved beside {out}; rerun the same command "
                              "to resume") from None
        raise Interrupted(f"{stage} stopped before it saved anything; rerun the same command to start again") from None


def count_saved(done: Callable[[], int], total: Callable[[], int], unit: str) -> Callable[[], str | None]:
    """Returns `saved` for `lifecycle`: "d of t <unit>" while d (read at the interrupt) is above 0, else None."""
    return lambda: f"{done()} of {total()} {unit}" if done() > 0 else None


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


class Origin(NamedTuple):
    """What a stage's results were computed on, when it loaded no model (import-usage): for `store`."""

    identity: Any  # profile.identity.ModelIdentity
    fingerprint: str


def store(out: Path, source: RoutingProfile, origin: Any, change: Callable[[RoutingProfile], Any], *,
          domain: str | None = None, writes_usage: bool = False) -> RoutingProfile:
    """Writes a stage's results into the profile at `out` under its lock and returns what was written.

    `origin`: what the results were computed on, its `.identity` and `.fingerprint` (a LoadedModel, or
    import-usage's checkpoint description). The file is read again under the lock, so whatever other
    writers stored meanwhile (other domains, other stages) is kept and `change` sets only this stage's
    entries; a new `out` starts from `source`, the profile the stage read. With `domain`, refuses when that
    domain's usage counts in `out` changed since the stage read them: its results would belong to other
    counts, or (`writes_usage`, a stage that writes the counts) a second writer of the same domain would be
    silently overwritten.
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
            same = (read is None and now is None) or (read is not None and now is not None and torch.equal(read, now))
            if writes_usage and not same:
                raise ProfileError(f"another writer stored usage counts of '{domain}' in {out} while this run counted; "
                                   f"nothing was written (rerun to replace them, or write to another --out)")
            if not writes_usage and read is not None and not same:
                raise ProfileError(f"the usage counts of '{domain}' in {out} changed while this stage ran "
                                   "(another `banpick profile` wrote them); rerun this stage")
        change(current)

    return update_profile(out, apply, model=origin.identity, fingerprint=origin.fingerprint)[0]


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


def provenance(stage: str, settings: Any, loaded: LoadedModel | None, **facts: Any) -> dict[str, Any]:
    """Returns the provenance record a stage stores: its settings, the run's facts, and when/how.

    `loaded`: the model the stage ran (its device and dtype are recorded); None for a stage that ran none
    (import-usage reads serving dumps)."""
    record: dict[str, Any] = {
        "stage": stage,
        "settings": asdict(settings) if is_dataclass(settings) else dict(settings),
        "device": str(loaded.device) if loaded is not None else "none",
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", "") if loaded is not None else None,
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
