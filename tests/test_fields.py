"""One declaration per field: `sweeper trial --help` lists every field with the range validation enforces.

The ranges are read back from the help text the user sees (not from the declarations), resolved with
this file's own table of the dependent bounds on the default digits config, and probed against
``TrialConfig``: each bound accepted or refused exactly as its bracket says, one step outside refused.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import typer

from sweeper.cli import app
from trainables.config import ConfigError, TrialConfig
from trainables.fields import Interval, field, specs, validate

# the dependent bounds as the help names them, on the default config (digits: 8x8, 10 classes)
REFS = {
    "image side": 8,
    "classes - 1": 9,
    "image side - trigger_size": 6,
    "hessian_iterations": 20,
    "image side / 2 - 1": 3,
}
# fields other fields are bounded by: probed with those at their loosest (their help names this field)
COMPANIONS = {"hessian_iterations": {"hessian_top_k": 1, "hessian_max_iterations": 100_000}}
RANGE = re.compile(r"(?:in ([\[(])([^,\]]+), ([^\])]+)([\])])|(>=|>) (\S+?)\.?$)")


def _trial_help() -> dict[str, str]:
    from sweeper.cli.trial import declare_options

    declare_options()  # as main() does: the options of the fields and registries declared now
    cmd = typer.main.get_command(app).commands["trial"]
    return {p.name: " ".join((p.help or "").replace("\\[", "[").split()) for p in cmd.params}


def _bound(text: str) -> float:
    text = text.strip()
    return REFS[text] if text in REFS else float(text)


def _range(help_text: str):
    """(lo, hi, lo_closed, hi_closed) read from a help text's first range, or None."""
    m = RANGE.search(help_text.split(" [default:")[0].rsplit("; ", 1)[-1])
    if m is None:
        return None
    if m.group(5):
        return _bound(m.group(6)), None, m.group(5) == ">=", False
    return _bound(m.group(2)), _bound(m.group(3)), m.group(1) == "[", m.group(4) == "]"


def _probe(make, name: str, rng, integer: bool, as_list: bool) -> list[str]:
    """Values at and beyond each bound whose acceptance disagrees with the range; [] when they agree."""
    lo, hi, lo_in, hi_in = rng
    step = 1 if integer else 1e-6
    cases = [(lo, lo_in), (lo - step, False)]
    if hi is not None:
        cases += [(hi, hi_in), (hi + step, False)]
    wrong = []
    for v, ok in cases:
        v = int(v) if integer else v
        value = str(v) if as_list else v
        try:
            make(**{name: value})
            accepted = True
        except ConfigError:
            accepted = False
        if accepted != ok:
            wrong.append(f"{name}={v!r} {'accepted' if accepted else 'refused'}")
    return wrong


def test_trial_help_lists_every_field_with_the_range_validation_enforces():
    helps = _trial_help()
    declared = specs(TrialConfig)
    assert set(declared) <= set(helps), sorted(set(declared) - set(helps))
    probed, wrong = 0, []
    for name, d in declared.items():
        text = helps[name]
        assert text.startswith(d.spec.help), (name, text)  # the declaration's help, then its range
        rng = _range(text)
        check = d.spec.check
        if isinstance(check, Interval) or hasattr(check, "item"):
            assert rng is not None, (name, text)
            integer = (check.item if hasattr(check, "item") else check).kind is int
            make = functools.partial(TrialConfig, **COMPANIONS.get(name, {}))
            wrong += _probe(make, name, rng, integer, hasattr(check, "item"))
            probed += 1
        elif "one of " in text:  # options: every listed name is valid, an unlisted one is not
            names = [n.split(" = ")[0].strip() for n in re.split(r"[,;] ", text.split("one of ", 1)[1].rstrip("."))]
            for n in names:
                if n in ("cnn", "linear") or name != "model":
                    TrialConfig(**{name: n.removesuffix(".")})
            with pytest.raises(ConfigError):
                TrialConfig(**{name: "no-such-choice"})
    assert not wrong, wrong
    assert probed == 44  # every numeric field of the network trial (and list of numbers)


def test_the_range_probe_catches_help_that_disagrees_with_validation():
    """A help text saying [0, 10] for a field validated as [0, 5] is caught (the comparison can fail)."""

    @dataclasses.dataclass(frozen=True)
    class Toy:
        width: int = field(1, Interval(int, 0, 5), "A width")

        def __post_init__(self):
            validate(self)

    assert _probe(Toy, "width", _range("A width; in [0, 5]."), True, False) == []
    wrong = _probe(Toy, "width", _range("A width; in [0, 10]."), True, False)
    assert wrong == ["width=10 refused"]


def test_kernel_and_linear_configs_are_declared_the_same_way():
    from trainables.exact_models.kernel import KernelConfig
    from trainables.exact_models.linear import LinearConfig

    for cls in (KernelConfig, LinearConfig):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(specs(cls)) == fields  # every field declared, none by hand
    with pytest.raises(ConfigError, match=r"ell=0.0 is invalid: must be in \(0, 1e\+06\]"):
        KernelConfig(ell=0.0)
    with pytest.raises(
        ConfigError, match=r"trigger_margin=7 is invalid: must be in \[0, 6\] \(image side - trigger_size\)"
    ):
        LinearConfig(trigger_margin=7)
