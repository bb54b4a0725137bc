"""The record format: what a trial's and a sweep's records are, shared by their writer and readers.

``sweeper`` writes sweeps (MLflow runs, tags, ``sweeper.json``) and ``analysis`` reads them; both
import the format from here, below both, so the writer never depends on the reader's modules:

* the MLflow tag names and the final statuses;
* how a trial is keyed (:func:`trial_key`): a hash of its config, the same on every node and after
  every restart;
* how one row of results is made from a config and metrics (:func:`trial_row`);
* a sweep's ``sweeper.json`` as a :class:`SweepMeta` (read and written by ``analysis.schema``);
* a trial's status in every view (:func:`trial_status`);
* a defence search's vocabulary: objectives and their one parser, threat sets, the metrics a search
  can aggregate.

Plain Python (no torch, MLflow or pyarrow): the config declarations are read for the defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trainables.errors import SweeperError

TAG_SWEEP = "sweeper.sweep"
TAG_KEY = "sweeper.trial_key"
TAG_TRIAL_ID = "sweeper.trial_id"
TAG_STATUS = "sweeper.status"
TAG_KIND = "sweeper.kind"  # 'sweep' (the parent run), 'trial' (a model) or 'defence' (a search's defence)
TAG_DEFENCE = "sweeper.defence_key"  # on a defence search's model runs: the defence they were trained for
TAG_COMMIT = "sweeper.git_commit"
TAG_ERROR = "sweeper.error"
TAG_DIVERGED_EPOCH = "sweeper.diverged_epoch"
TAG_NODE = "sweeper.ray_node"  # the Ray node (its id) that last ran the trial: on a cluster, where it ran
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a trial run under the sweep's parent run
FINAL_STATUSES = ("completed", "diverged")
META = "sweeper.json"

# metrics that share a name with a config field: the per-epoch penalty value, the last epoch's
# scheduled learning rate and the number of samples actually averaged into the Hessian
METRIC_RENAMES = {"penalty": "penalty_value", "lr": "lr_last", "hessian_samples": "hessian_samples_used"}


# ----------------------------------------------------------------------------- keys and rows
KEY_FORMAT = 2  # the trial-key format new sweeps write (sweeper.json's key_format; absent: 1)


def trial_key(config: dict[str, Any], key_format: int = KEY_FORMAT) -> str:
    """A stable 16-hex id of a trial's full config (what makes two trials the same trial).

    Format 2 hashes only the fields that differ from their defaults (with the format number), so a
    new field with a default leaves every existing key, and so every resumable sweep, as it was.
    Changing a field's default is a key-breaking change: it needs a new format. Format 1 (sweeps
    made before it) hashed every field.
    """
    if key_format >= 2:
        defaults = field_defaults(config.get("kind", "network"))
        config = {k: v for k, v in config.items() if k not in defaults or _json(v) != _json(defaults[k])}
        config["_key_format"] = key_format
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)  # a tuple default equals its list value


def field_defaults(kind: str) -> dict[str, Any]:
    """Each field's default of a trial kind's config (``kind`` itself included: never hashed)."""
    from trainables import config_class

    try:
        cls = config_class(kind)
    except SweeperError:  # an unknown kind (a plugin not loaded here): every field is hashed
        return {}
    out = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    out.update(
        {f.name: f.default_factory() for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
    )
    out["kind"] = kind
    return out


ROW_COLUMNS = ("sweep", "run_id", "trial_key", "trial_id", "status", "error", "kind")  # every row has these


def metric_column(name: str, config_fields) -> str:
    """The results column of metric ``name``: renamed when a config field or a row column has that name."""
    if name in METRIC_RENAMES:
        return METRIC_RENAMES[name]
    return f"{name}_metric" if name in config_fields or name in ROW_COLUMNS else name


def trial_row(config: dict[str, Any], metrics: dict[str, Any], config_fields) -> dict[str, Any]:
    """One results row: every config field under its own name, then the metrics (scalars only)."""
    row = {k: v for k, v in config.items() if k in config_fields}
    for k, v in metrics.items():
        if isinstance(v, dict | list):
            continue
        row[metric_column(k, config_fields)] = v
    return row


# ----------------------------------------------------------------------------- the sweep record
@dataclass
class SweepMeta:
    """A sweep's ``sweeper.json``: what it owes, where it tracks, how it runs (written once at launch;
    ``driver`` is rewritten by each resume). Read and written only through :func:`read_meta` /
    :func:`write_meta`."""

    name: str  # folder and MLflow experiment
    storage: str  # absolute local folder, or a URI (file://, s3://...)
    mlflow_uri: str  # the tracking store
    spec: dict[str, Any]  # SweepSpec.to_dict() (grid) or the search space; spec["axes"] names what varies
    n_trials: int  # trials the sweep owes (a search: its budget)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None until Ray says whether the cluster has GPUs
    max_concurrent: int | None = None
    max_failures: int = 2
    address: str | None = None  # the Ray cluster it joined (None: a local Ray)
    verbose: int = 1
    live: bool | None = None  # progress as a live bar (None: when stdout is a terminal)
    created: str = ""  # local time of the launch
    git_commit: str = ""
    driver: dict[str, Any] = field(default_factory=dict)  # host and pid of the process running it
    trials: list[dict[str, Any]] | None = None  # grid: every owed trial's key and varying values
    kind: str = "grid"  # grid | search
    search: dict[str, Any] | None = None  # budget, sampler, seed, optuna_storage
    experiment_id: str | None = None
    parent_run_id: str | None = None
    key_format: int = 1  # trial keys' format (trial_key); sweeps written before it have none: 1
    slurm_job: str | None = None  # the SLURM job that started it (sweeper run --slurm), else None
    # Ray Tune's result loggers. "json-csv": sweeper passes Tune's JSON and CSV loggers and turns off the ones Tune
    # adds, its TensorBoard logger among them (tensorboardX imports torch into the driver, ~1.3 s, and nothing reads
    # its files). "default": Tune adds its three (sweeps written before; their restored Tuners hold no loggers).
    tune_loggers: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepMeta:
        """Tolerates keys of other versions: unknown ones are dropped, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def trial_status(tag: str | None, alive: bool) -> str:
    """A trial's status as every view shows it (``sweeper status``, the run and resume summaries,
    ``frontier``, ``report``): its MLflow run's ``sweeper.status`` tag (none yet: running), except
    that a run still marked running whose driver is gone (``alive`` False) is ``interrupted``."""
    status = tag if isinstance(tag, str) and tag else "running"
    return "interrupted" if status == "running" and not alive else status


# ----------------------------------------------------------------------------- a defence search
def objective_parts(text: str, aggregates: Sequence[str] = ()) -> list[tuple[str, str, str | None]]:
    """The one parser of ``--objectives``: ``METRIC:max|min`` (and ``:AGG`` when ``aggregates`` allows one, as a
    defence search does), comma-separated, at least two, each metric once. Raises ValueError naming the part."""
    out = []
    for part in text.split(","):
        bits = [b.strip() for b in part.split(":")]
        ok = (
            len(bits) in ((2, 3) if aggregates else (2,))
            and bool(bits[0])
            and bits[1] in ("max", "min")
            and (len(bits) == 2 or bits[2] in aggregates)
        )
        if not ok:
            tail = f", optionally followed by {' or '.join(':' + a for a in aggregates)}" if aggregates else ""
            raise ValueError(f"{part!r} is invalid: expected METRIC:max or METRIC:min{tail}")
        out.append((bits[0], bits[1], bits[2] if len(bits) == 3 else None))
    if len(out) < 2:
        raise ValueError(f"{text!r}: a frontier needs at least two objectives")
    if len({m for m, _, _ in out}) != len(out):
        raise ValueError(f"{text!r}: a metric appears twice")
    return out


AGGREGATES = ("worst", "mean")
DEFAULT_AGGREGATE = {"asr": "worst"}  # every other objective: mean over threats
DEFENCE_KEY = "defence_key"  # the results column (and MLflow tag) naming a model's defence


@dataclass(frozen=True)
class Objective:
    """One objective of a defence search."""

    metric: str  # a final metric of every model (clean_acc, asr, train_seconds, ...)
    direction: str  # max | min
    aggregate: str  # worst | mean: how the per-threat means are combined

    def text(self) -> str:
        return f"{self.metric}:{self.direction}:{self.aggregate}"


def parse_objectives(text: str | None, aggregate: str | None = None, search: bool = True) -> list[Objective]:
    """``clean_acc:max,asr:min`` -> objectives: the one parser of ``--objectives`` (see :func:`objective_parts`).

    In a defence search (``search``) each may end in ``:worst`` or ``:mean``, the aggregation over threats;
    ``aggregate`` sets every objective's; without either, ASR is taken at its worst and every other
    objective averaged. A sweep's frontier (``search=False``) takes ``METRIC:max|min`` only.
    """
    if aggregate is not None and aggregate not in AGGREGATES:
        raise SweeperError(f"--aggregate {aggregate!r} is invalid: must be worst or mean")
    try:  # a search adds the aggregation over threats
        parts = objective_parts(text or "clean_acc:max,asr:min", AGGREGATES if search else ())
    except ValueError as e:
        raise SweeperError(f"--objectives: {e}") from None
    return [Objective(m, d, aggregate or agg or DEFAULT_AGGREGATE.get(m, "mean")) for m, d, agg in parts]


def threat_set(threats: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the listed threat values (fields in a stable order)."""
    names = sorted(threats)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(threats[n] for n in names))]


def threat_label(threat: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in threat.items())


def threats_json(threats: list[dict[str, Any]]) -> str:
    """The threat set as one MLflow param (sorted, compact)."""
    return json.dumps(threats, sort_keys=True, separators=(",", ":"))


# final metrics of every network model (the objectives a search can aggregate); det_* detection scores too
OBJECTIVE_METRICS = (
    "clean_acc",
    "asr",
    "train_seconds",
    "train_loss",
    "train_acc",
    "lambda_1",
    "max_overlap_sq",
    "hessian_seconds",
    "hessian_trace",
    "fisher_trace",
    "effective_rank",
    "penalty_value",
)


def check_metrics(objectives: Sequence[Objective]) -> None:
    """Refuse, before anything runs, an objective no model will report."""
    for o in objectives:
        if o.metric not in OBJECTIVE_METRICS and not o.metric.startswith("det_"):
            raise SweeperError(
                f"--objectives: {o.metric!r} is not a model metric; valid: "
                f"{', '.join(OBJECTIVE_METRICS)} or a det_* detection score"
            )


def is_defence_search(meta) -> bool:
    """Whether a sweep's ``sweeper.json`` describes a defence search (threats fixed, defences searched)."""
    return meta is not None and meta.kind == "search" and (meta.search or {}).get("threats") is not None


def stored_objectives(search: dict[str, Any]) -> list[Objective]:
    """A search's objectives as ``sweeper.json`` keeps them (``METRIC:DIR:AGG`` texts)."""
    return [Objective(*text.split(":")) for text in search["objectives"]]
