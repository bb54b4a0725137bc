"""Search spaces: value lists, ranges and log ranges, from flags or a YAML sweep file.

A :class:`SweepSpec` holds grid axes (any TrialConfig field, each a list of values), fixed
fields and seeds. :meth:`SweepSpec.configs` builds and validates every TrialConfig of the grid
*before* Ray starts, so a bad value anywhere is one clear error and no trial runs.

Value syntax (flags and strings in sweep files alike):
  ``0,0.01,0.02``          a list
  ``0.001:0.03:0.001``     start:stop:step, stop included
  ``log:1e2:1e5:4``        4 log-spaced values from 1e2 to 1e5, both included
  ``on`` / ``off`` / ``both``  for true/false fields (``both`` = [false, true])

List-valued fields (declared as lists: ``detect_baselines``, ``detect_windows``, ``detect_norms``) take a
list as ONE value, the same in ``trial``, ``run``, ``plan``, ``search`` and a sweep file's ``fixed:``:
  ``nc,ss,ac``             one value, the list nc, ss, ac (``+`` separates items too: ``nc+ss``)
  ``nc,ss|ac``             an axis over lists: [nc, ss] and [ac] (``|`` separates the axis' values)
In a sweep file's ``grid:`` the YAML list is the axis and each element one list (``[[nc, ss], [ac]]``).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.config import SweeperError
from trainables.fields import Declared, specs, value_type


def fields_for(kind: str) -> dict[str, Declared]:
    """The declared fields of a trial kind's config (network, kernel, linear, a plugin's), plugin fields included."""
    from trainables import config_class

    return specs(config_class(kind))


AXIS_SEP = "|"  # separates the values of an axis over lists: `|` is no item of any list and reads as "or"


def is_list_field(name: str, kind: str = "network") -> bool:
    """Whether ``name`` is a list-valued field of the trial kind (``a,b,c`` is then one value), as declared."""
    d = fields_for(kind).get(name)
    return d is not None and d.is_list


MAX_TRIALS = 100_000


def absolute_data_dir(point: dict[str, Any], fields: dict | None = None) -> dict[str, Any]:
    """``data_dir`` made absolute (Ray runs trials elsewhere; the trial key must not depend on cwd).

    With ``fields`` given, a kind that has a data_dir gets its default filled in first.
    """
    if fields is not None and "data_dir" in fields:
        point.setdefault("data_dir", fields["data_dir"].default)
    if "data_dir" in point:
        point["data_dir"] = str(Path(point["data_dir"]).expanduser().absolute())
    return point


def check_asked(values: dict[str, Any]) -> None:
    """What a user asks for must be able to happen: ``detect=true`` with ``hessian=false`` would silently give
    no detection statistic (they are read off the spectrum). Checked on new input only: records of sweeps made
    when detect's default was true (with ``hessian=false``) stay valid configs."""
    if values.get("detect") is True and values.get("hessian") is False:
        raise SpaceError(
            "detect=True is invalid: needs hessian=true (the statistics are computed from the "
            "input-Hessian spectrum; the baselines of detect_baselines run without it)"
        )


class SpaceError(SweeperError):
    """A bad search-space value: names the flag or key, the value and the valid syntax."""


def _kind(name: str, fields: dict | None = None) -> type:
    return value_type((fields or fields_for("network"))[name].spec)  # the type its declaration gives


def _scalar(name: str, text: Any, where: str, fields: dict | None = None) -> Any:
    kind = _kind(name, fields)
    if not isinstance(text, str):
        if kind is float and isinstance(text, int | float) and not isinstance(text, bool):
            return float(text)
        if kind is bool and not isinstance(text, bool):
            raise SpaceError(f"{where}={text!r} is invalid: expected true/false, on/off")
        return text
    t = text.strip()
    if kind is bool:
        low = t.lower()
        if low in ("on", "true", "yes", "1"):
            return True
        if low in ("off", "false", "no", "0"):
            return False
        raise SpaceError(f"{where}={text!r} is invalid: expected on, off or both")
    if kind is int:
        try:
            f = float(t)
        except ValueError:
            raise SpaceError(f"{where}={text!r} is invalid: expected an integer") from None
        if not f.is_integer():
            raise SpaceError(f"{where}={text!r} is invalid: expected an integer")
        return int(f)
    if kind is float:
        try:
            return float(t)
        except ValueError:
            raise SpaceError(f"{where}={text!r} is invalid: expected a number") from None
    return t


def _one_list(item: Any, label: str, spec: Any) -> str:
    """One value of a list field in the comma form the config stores: a YAML list, ``a,b`` / ``a+b``, or a scalar."""
    if isinstance(item, list | tuple):
        parts = [str(t) for t in item]
    elif isinstance(item, str):
        if AXIS_SEP in item:  # only reachable from a YAML list: there the list itself is the axis
            raise SpaceError(
                f"{label}={spec!r} is invalid: in a YAML list each element is one value; write the axis "
                f"as a list of lists ([[nc, ss], [ac]]) or as one string ('nc,ss{AXIS_SEP}ac')"
            )
        parts = re.split(r"[,+]", item)
    else:  # a YAML number: a one-item list
        parts = [str(item)]
    return ",".join(p.strip() for p in parts if p.strip())


def _list_values(spec: Any, label: str) -> list[str]:
    """The values of a list field: ``a,b,c`` is ONE value; ``a,b|c`` (or a sweep file's YAML list of lists)
    is an axis over lists. ``""`` is a value too (an empty list: no baselines)."""
    if isinstance(spec, list | tuple):  # a sweep file's grid: the YAML list is the axis, each element one list
        vals = [_one_list(v, label, spec) for v in spec]
    elif isinstance(spec, str):
        vals = [_one_list(v, label, spec) for v in spec.split(AXIS_SEP)]
    else:
        vals = [_one_list(spec, label, spec)]
    if not vals:
        raise SpaceError(f"{label}={spec!r} is invalid: no values")
    return list(dict.fromkeys(vals))  # drop repeats, keep order


def parse_values(name: str, spec: Any, where: str = "--", kind: str = "network") -> list[Any]:
    """Parse one axis (a string in the syntax above, a list, or a scalar) into a list of values.

    For a list-valued field each value is one whole list (declared as a list, see :func:`is_list_field`): ``a,b`` is one value.
    """
    fields = fields_for(kind)
    if name not in fields:
        head = f"--set {name}={spec}" if where == "--" else f"{where} {name}={spec!r}"
        raise SpaceError(f"{head} is invalid: {name} is not a {kind}-trial field; valid fields: {sorted(fields)}")
    label = f"{where}{name.replace('_', '-')}" if where == "--" else f"{where} {name}"
    if is_list_field(name, kind):
        return _list_values(spec, label)
    if isinstance(spec, list | tuple):
        vals = [_scalar(name, v, label, fields) for v in spec]
    elif not isinstance(spec, str):
        vals = [_scalar(name, spec, label, fields)]
    else:
        s = spec.strip()
        kind = _kind(name, fields)
        if kind is bool and s.lower() == "both":
            vals = [False, True]
        elif s.lower().startswith("log:"):
            parts = s.split(":")
            if len(parts) != 4 or kind is not float:
                raise SpaceError(f"{label}={spec!r} is invalid: log ranges are log:START:STOP:COUNT for numeric fields")
            a, b, n = _scalar(name, parts[1], label, fields), _scalar(name, parts[2], label, fields), parts[3]
            if not n.isdigit() or int(n) < 1 or a <= 0 or b <= 0:
                raise SpaceError(
                    f"{label}={spec!r} is invalid: log:START:STOP:COUNT needs START, STOP > 0 and COUNT >= 1"
                )
            n = int(n)
            vals = [a] if n == 1 else [float(f"{a * (b / a) ** (i / (n - 1)):.12g}") for i in range(n)]
        elif ":" in s and kind in (int, float):
            parts = s.split(":")
            if len(parts) != 3:
                raise SpaceError(f"{label}={spec!r} is invalid: ranges are START:STOP:STEP")
            a, b, step = (_scalar(name, p, label, fields) for p in parts)
            if step <= 0 or b < a:
                raise SpaceError(f"{label}={spec!r} is invalid: START:STOP:STEP needs STEP > 0 and STOP >= START")
            n = int(math.floor((b - a) / step + 1e-9)) + 1
            if n > MAX_TRIALS:
                raise SpaceError(f"{label}={spec!r} gives {n} values, more than {MAX_TRIALS}")
            vals = [kind(float(f"{a + i * step:.12g}")) for i in range(n)]
        else:
            vals = [_scalar(name, v, label, fields) for v in s.split(",") if v.strip() != ""]
    if not vals:
        raise SpaceError(f"{label}={spec!r} is invalid: no values")
    return list(dict.fromkeys(vals))  # drop repeats, keep order


@dataclass
class SweepSpec:
    """Grid axes × fixed fields × seeds: everything that defines a sweep's trials."""

    axes: dict[str, list[Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None  # None: the TrialConfig seed (or an axis/fixed value)
    kind: str = "network"  # network | kernel | linear

    def __post_init__(self):
        both = set(self.axes) & set(self.fixed)
        if both:
            raise SpaceError(f"field(s) {sorted(both)} are given both as an axis and as a fixed value")
        if self.seeds is not None and ("seed" in self.axes or "seed" in self.fixed):
            raise SpaceError("seeds are given twice: use either --seeds or a seed axis/field")

    @property
    def size(self) -> int:
        """Number of trials in the grid."""
        n = math.prod(len(v) for v in self.axes.values())
        return n * (len(self.seeds) if self.seeds else 1)

    def describe(self) -> str:
        """The trial count and where it comes from, e.g. ``8 trials (theta x kappa = 2 x 4)``."""
        counts = {name: len(vals) for name, vals in self.axes.items()}
        if self.seeds:
            counts["seed"] = len(self.seeds)
        text = f"{self.size} trial{'' if self.size == 1 else 's'}"
        if not counts:
            return text
        return f"{text} ({' x '.join(counts)} = {' x '.join(str(n) for n in counts.values())})"

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as a dict of field values (fixed fields included)."""
        names = list(self.axes)
        seeds = self.seeds or [None]
        out = []
        for combo in itertools.product(*(self.axes[n] for n in names)):
            for seed in seeds:
                d = dict(self.fixed)
                d.update(zip(names, combo, strict=True))
                if seed is not None:
                    d["seed"] = seed
                out.append(d)
        return out

    def configs(self) -> list[Any]:
        """Validated configs of the whole grid; the first bad point is one error naming it."""
        from trainables import make_config

        if self.size > MAX_TRIALS:
            raise SpaceError(f"the grid has {self.size} trials, more than {MAX_TRIALS}")
        fields = fields_for(self.kind)
        out = []
        for point in self.points():
            absolute_data_dir(point, fields)
            point["kind"] = self.kind
            try:
                check_asked(point)
                out.append(make_config(point))
            except SweeperError as e:
                shown = {k: v for k, v in point.items() if k in self.axes or k == "seed"}
                raise SpaceError(f"{e} (grid point {shown})" if shown else str(e)) from None
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (kept in the sweep folder)."""
        return {"axes": self.axes, "fixed": self.fixed, "seeds": self.seeds, "kind": self.kind}

    # the interface a grid and a search space share (sweeper.orchestrate.prepare reads only these)
    owes_every_trial = True  # the sweep's record lists every trial it owes: none is ever silently dropped

    def checked_configs(self) -> list:
        """Every trial of the grid, validated (a bad value is one SpaceError naming its point)."""
        return self.configs()

    def gives(self, name: str) -> bool:
        """Whether the space sets field ``name`` (as an axis or fixed)."""
        return name in self.axes or name in self.fixed

    def params(self) -> dict[str, Any]:
        """The space as the sweep's parent-run params: ``grid.<axis>``, ``fixed.<field>``, ``seeds``."""
        out = {f"grid.{k}": ",".join(map(str, v)) for k, v in self.axes.items()}
        out.update({f"fixed.{k}": v for k, v in self.fixed.items()})
        if self.seeds:
            out["seeds"] = ",".join(map(str, self.seeds))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            axes=dict(d.get("axes", {})),
            fixed=dict(d.get("fixed", {})),
            seeds=d.get("seeds"),
            kind=d.get("kind", "network"),
        )


def parse_seeds(spec: Any, where: str = "--seeds") -> list[int]:
    """``N`` means seeds 0..N-1; a list or ``a,b,c`` gives them explicitly."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise SpaceError(f"{where}={spec} is invalid: must be >= 1")
        return list(range(spec))
    if isinstance(spec, str) and spec.strip().isdigit() and "," not in spec:
        return parse_seeds(int(spec), where)
    vals = parse_values("seed", spec, where="" if where != "--seeds" else "--")
    return [int(v) for v in vals]


def load_sweep_file(path: Path) -> tuple[SweepSpec, str | None]:
    """A YAML sweep file: ``name``, ``grid`` (field: values), ``fixed`` (field: value), ``seeds``."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise SpaceError(f"sweep file {path} cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"sweep file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"sweep file {path} must be a mapping with keys name, grid, fixed, seeds")
    unknown = sorted(set(data) - {"name", "grid", "fixed", "seeds", "kind"})
    if unknown:
        raise SpaceError(f"sweep file {path}: unknown key(s) {unknown}; valid keys: fixed, grid, kind, name, seeds")
    from trainables import TRIAL_KINDS, load_plugins

    load_plugins()  # a kind registered by a plugin is a valid kind
    kind = data.get("kind", "network")
    if kind not in TRIAL_KINDS:
        raise SpaceError(f"sweep file {path}: kind={kind!r} is invalid: must be one of {', '.join(TRIAL_KINDS)}")
    grid, fixed = data.get("grid") or {}, data.get("fixed") or {}
    if not isinstance(grid, dict) or not isinstance(fixed, dict):
        raise SpaceError(f"sweep file {path}: grid and fixed must be mappings of field: value")
    where = f"sweep file {path}:"
    axes = {k: parse_values(k, v, where, kind) for k, v in grid.items()}
    fields = fields_for(kind)
    for k in fixed:
        if k not in fields:
            raise SpaceError(f"{where} fixed field {k!r} is not a trial field; valid fields: {sorted(fields)}")
        if is_list_field(k, kind) and isinstance(fixed[k], str) and AXIS_SEP in fixed[k]:
            raise SpaceError(
                f"{where} fixed {k}={fixed[k]!r} is invalid: fixed: holds one value (a list); "
                f"an axis over lists ({AXIS_SEP}) belongs under grid:"
            )
    fixed = dict(fixed)
    if isinstance(fixed.get("data_dir"), str):  # relative to the file, wherever `sweeper` runs from
        fixed["data_dir"] = file_relative(path, fixed["data_dir"])
    if "data_dir" in axes:
        axes["data_dir"] = [file_relative(path, v) if isinstance(v, str) else v for v in axes["data_dir"]]
    seeds = parse_seeds(data["seeds"], f"{where} seeds") if data.get("seeds") is not None else None
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise SpaceError(f"{where} name={name!r} must be a string")
    return SweepSpec(axes=axes, fixed=fixed, seeds=seeds, kind=kind), name


def file_relative(sweep_file: Path, folder: str) -> str:
    """A folder named in a sweep file, absolute: a relative one is read from the file's own folder
    (``~`` is the user's home), so the same file works from any working directory."""
    p = Path(folder).expanduser()
    return os.path.normpath(p if p.is_absolute() else Path(sweep_file).absolute().parent / p)


# ----------------------------------------------------------------------------- configs from files, flags and --set
def load_config_file(path: Path, names: set[str] | None = None) -> dict[str, Any]:
    """A YAML or JSON mapping of trial fields (``names``, default TrialConfig's); unknown ones are rejected."""
    import json

    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SweeperError(f"config file {path} cannot be read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0]
        raise SweeperError(f"config file {path} is not valid {path.suffix.lstrip('.').upper()}: {first}") from None
    if not isinstance(data, dict):
        raise SweeperError(f"config file {path} must hold a mapping of field: value, found {type(data).__name__}")
    names = names if names is not None else set(fields_for("network"))
    unknown = sorted(set(data) - names)
    if unknown:
        raise SweeperError(f"config file {path}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    return data


def split_sets(items: list[str] | None) -> list[tuple[str, str]]:
    """``--set FIELD=VALUE`` items as (field, text) pairs."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise SpaceError(f"--set {item!r} is invalid: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        out.append((k.strip().replace("-", "_"), v))
    return out


def parse_sets(items: list[str] | None, kind: str = "network") -> dict[str, Any]:
    """``--set FIELD=VALUE`` pairs of one trial, typed by the kind's config."""
    out: dict[str, Any] = {}
    for k, v in split_sets(items):
        vals = parse_values(k, v, kind=kind)
        if len(vals) != 1:
            raise SpaceError(f"--set {k}={v!r} is invalid: a single trial takes one value (use sweeper run for lists)")
        out[k] = vals[0]
    return out


def trial_config(
    kind: str = "network",
    config_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
):
    """One validated trial config, merged in one order everywhere: defaults < config file < flags < ``--set``.

    ``flags`` holds only the options given explicitly; a flag that is not a field of ``kind`` is an error.
    """
    fields = fields_for(kind)
    values = load_config_file(config_file, set(fields)) if config_file else {}
    for name, value in (flags or {}).items():
        if name not in fields:
            raise SweeperError(
                f"--{name.replace('_', '-')} does not apply to --kind {kind}; its fields "
                f"(set with --set FIELD=VALUE): {sorted(set(fields) - {'kind'})}"
            )
        values[name] = value
    values.update(parse_sets(sets, kind))
    if "kind" in fields:
        values["kind"] = kind
    from trainables import config_class

    check_asked(values)
    return config_class(kind).from_dict(absolute_data_dir(values, fields))


def build_spec(
    sweep_file: Path | None,
    flags: dict[str, str | None],
    seeds: str | None,
    sets: list[str] | None,
    kind: str | None = None,
) -> tuple[SweepSpec, str | None]:
    """The sweep's grid in one order: sweep file (or the kind's embedded defaults) < flags < ``--set``.

    ``kind`` None: the sweep file's, else network. Returns the spec and the sweep file's ``name`` (None without one).
    """
    if sweep_file is not None:
        spec, file_name = load_sweep_file(sweep_file)
        axes, fixed, seed_list = dict(spec.axes), dict(spec.fixed), spec.seeds
        kind = kind or spec.kind
    else:
        from trainables import trial_kind

        kind = kind or "network"
        entry = trial_kind(kind)
        file_name, axes, fixed, seed_list = None, dict(entry.default_axes), dict(entry.default_fixed), None
    given = [(k, v) for k, v in flags.items() if v is not None] + split_sets(sets)
    for key, text in given:
        vals = parse_values(key, text, kind=kind)
        axes.pop(key, None)
        fixed.pop(key, None)
        if len(vals) == 1:
            fixed[key] = vals[0]
        else:
            axes[key] = vals
    if seeds is not None:
        seed_list = parse_seeds(seeds)
        axes.pop("seed", None)
        fixed.pop("seed", None)
    return SweepSpec(axes=axes, fixed=fixed, seeds=seed_list, kind=kind), file_name
