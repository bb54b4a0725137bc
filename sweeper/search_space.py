"""``sweeper search``'s space: continuous ranges, categorical choices and fixed fields (:class:`SearchSpec`).

The value syntax is :mod:`sweeper.spaces`' (``a,b`` a choice, ``LO:HI`` / ``log:LO:HI`` a range); the merge
order is the same: the embedded defaults < flags < ``--set``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from trainables.config import SweeperError, TrialConfig

from .spaces import SpaceError, _kind, _scalar, absolute_data_dir, check_asked, fields_for, parse_values, split_sets


@dataclass
class SearchSpec:
    """Continuous ranges, categorical choices and fixed fields for ``sweeper search``.

    Syntax per field: ``LO:HI`` (uniform), ``log:LO:HI`` (log-uniform), ``a,b,c`` (categorical),
    a single value (fixed); ``both`` for true/false fields. A list-valued field's ``a,b`` is one (fixed) value;
    ``a,b|c`` chooses between lists.
    """

    continuous: dict[str, tuple[str, float, float]] = field(default_factory=dict)  # name -> (dist, lo, hi)
    categorical: dict[str, list[Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def corner_configs(self) -> list[TrialConfig]:
        """Configs at every range end x every category: validates the whole space before Ray starts."""
        names = list(self.continuous) + list(self.categorical)
        choices = [[lo, hi] for _, lo, hi in self.continuous.values()] + list(self.categorical.values())
        out = []
        for combo in itertools.product(*choices):
            point = absolute_data_dir({**self.fixed, **dict(zip(names, combo, strict=True))}, fields_for("network"))
            try:
                check_asked(point)
                out.append(TrialConfig.from_dict(point))
            except SweeperError as e:
                raise SpaceError(f"{e} (search-space corner {dict(zip(names, combo, strict=True))})") from None
        return out

    def tune_space(self) -> dict[str, Any]:
        """The ``trial`` part of Ray Tune's param space."""
        from ray import tune

        base = self.corner_configs()[0].to_dict()
        space: dict[str, Any] = {
            k: v for k, v in base.items() if k not in self.continuous and k not in self.categorical
        }
        for name, (dist, lo, hi) in self.continuous.items():
            space[name] = tune.loguniform(lo, hi) if dist == "log" else tune.uniform(lo, hi)
        for name, vals in self.categorical.items():
            space[name] = tune.choice(vals)
        return space

    def to_dict(self) -> dict[str, Any]:
        return {"continuous": self.continuous, "categorical": self.categorical, "fixed": self.fixed}

    # the interface a grid and a search space share (sweeper.orchestrate.prepare reads only these)
    owes_every_trial = False  # a search owes a budget of proposals, not a list of trials
    kind = "network"

    def checked_configs(self) -> list[TrialConfig]:
        """Every corner of the space, validated: what the search can propose is a valid trial."""
        return self.corner_configs()

    def gives(self, name: str) -> bool:
        """Whether the space sets field ``name`` (a range, a choice or fixed)."""
        return name in self.continuous or name in self.categorical or name in self.fixed

    def params(self) -> dict[str, Any]:
        """The searched axes as the sweep's parent-run params (``search.<field>``)."""
        return {f"search.{k}": v for k, v in {**self.continuous, **self.categorical}.items()}


def parse_search_axis(name: str, spec: str) -> tuple[str, Any]:
    """('continuous', (dist, lo, hi)) | ('categorical', [...]) | ('fixed', value)."""
    fields = fields_for("network")
    if name not in fields:
        raise SpaceError(f"--set {name}={spec} is invalid: {name} is not a trial field; valid fields: {sorted(fields)}")
    label = f"--{name.replace('_', '-')}"
    s = spec.strip()
    kind = _kind(name)
    parts = s.split(":")
    if kind is float and (len(parts) == 2 or (len(parts) == 3 and parts[0].lower() == "log")):
        log = len(parts) == 3
        lo, hi = (_scalar(name, p, label) for p in parts[-2:])
        if not lo < hi or (log and lo <= 0):
            raise SpaceError(
                f"{label}={spec!r} is invalid: a range needs LO < HI" + (" and LO > 0 for log" if log else "")
            )
        return "continuous", ("log" if log else "uniform", lo, hi)
    vals = parse_values(name, s)
    return ("fixed", vals[0]) if len(vals) == 1 else ("categorical", vals)


def build_search_spec(flags: dict[str, str | None], sets: list[str] | None) -> SearchSpec:
    """``sweeper search``'s space: the embedded defaults < flags < ``--set``."""
    from trainables import trial_kind

    spec = SearchSpec(fixed=dict(trial_kind("network").default_fixed))
    given = [(k, v) for k, v in flags.items() if v is not None] + split_sets(sets)
    for key, text in given:
        where, value = parse_search_axis(key, text)
        for part in (spec.continuous, spec.categorical, spec.fixed):
            part.pop(key, None)
        getattr(spec, where)[key] = value
    return spec
