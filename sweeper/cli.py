"""The ``sweeper`` command line: a thin Typer layer over the library.

Every command is a plain function usable from Python. Bad input of any kind (a flag, a
config file, a dataset file, a checkpoint) ends in one line on stderr and exit code 2,
before any training starts; :func:`main` is the only place that catches.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.20 vendors its own click; its exceptions are the ones raised
    from typer._click import core as _click_core
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - older typer on real click
    from click import core as _click_core
    from click import exceptions as _click_exc

from trainables.config import DATASETS, SweeperError, TrialConfig

app = typer.Typer(
    name="sweeper",
    help="Sweep data-poisoning trials (poison fraction x gradient penalty x augmentation x epochs), "
         "track them in MLflow and draw the safety-efficacy frontier.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_D = {f.name: f.default for f in dataclasses.fields(TrialConfig)}

DatasetName = Enum("DatasetName", {k.replace("-", "_"): k for k in DATASETS}, type=str)


class TriggerName(str, Enum):
    lshape = "lshape"
    square = "square"
    warp = "warp"


class PoisonMode(str, Enum):
    stochastic = "stochastic"
    deterministic = "deterministic"


class Penalty(str, Enum):
    listing1 = "listing1"
    eq25 = "eq25"


class HessianSplit(str, Enum):
    auto = "auto"
    clean_train = "clean-train"
    poisoned_train = "poisoned-train"
    test = "test"


class HessianMethod(str, Enum):
    auto = "auto"
    double_backward = "double-backward"
    gauss_newton = "gauss-newton"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


@app.callback()
def _root() -> None:
    """Sweep data-poisoning trials, track them in MLflow and draw the safety-efficacy frontier."""


def _opt(help: str, **kw: Any) -> Any:
    return typer.Option(help=help, show_default=True, **kw)


def load_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON mapping of TrialConfig fields; unknown fields are rejected by name."""
    import yaml

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
    names = {f.name for f in dataclasses.fields(TrialConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SweeperError(f"config file {path}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    return data


def config_from_cli(ctx: typer.Context, params: dict[str, Any], config_file: Path | None) -> TrialConfig:
    """Merge a config file with the flags given explicitly (flags win), then validate once."""
    values = load_config_file(config_file) if config_file else {}
    for name, value in params.items():
        explicit = ctx.get_parameter_source(name) not in (_click_core.ParameterSource.DEFAULT, None)
        if explicit or name not in values:
            values[name] = value.value if isinstance(value, Enum) else value
    if "data_dir" in values:  # Ray and other drivers change the working directory
        values["data_dir"] = str(Path(values["data_dir"]).expanduser().absolute())
    return TrialConfig.from_dict(values)


@app.command()
def trial(
    ctx: typer.Context,
    dataset: Annotated[DatasetName, _opt("Dataset; digits ships with scikit-learn, the others are read from --data-dir.")] = _D["dataset"],
    data_dir: Annotated[str, _opt("Folder with the MNIST IDX / CIFAR pickle files.")] = _D["data_dir"],
    download: Annotated[bool, _opt("Download missing dataset files (needs internet).")] = _D["download"],
    verify_checksums: Annotated[bool, _opt("Check every dataset file against its published md5.")] = _D["verify_checksums"],
    model: Annotated[str, _opt("cnn | linear | preresnet<6n+2> (preresnet20, preresnet110).")] = _D["model"],
    trigger: Annotated[TriggerName, _opt("Backdoor trigger.")] = _D["trigger"],
    trigger_size: Annotated[int | None, _opt("Trigger arm/side in px [default: 2 for lshape; square 4, or 2 on 8x8].", min=1)] = None,
    trigger_margin: Annotated[int | None, _opt("Trigger distance from the border in px [default: 3 for lshape, 1 for square; 0 on 8x8].", min=0)] = None,
    warp_strength: Annotated[float, _opt("WaNet strength phi: displacement in [-1,1] image coordinates, in (0, 1].")] = _D["warp_strength"],
    warp_grid: Annotated[int, _opt("WaNet control grid side k, in [2, 64].")] = _D["warp_grid"],
    warp_seed: Annotated[int, _opt("Seed of the WaNet warp field.", min=0)] = _D["warp_seed"],
    poison_mode: Annotated[PoisonMode, _opt("stochastic: redrawn every epoch (Listing 4); deterministic: fixed per index (Listing 3).")] = _D["poison_mode"],
    theta: Annotated[float, _opt("Poison fraction of the non-target training samples, in [0, 1).")] = _D["theta"],
    target: Annotated[int, _opt("Target class of the backdoor, in [0, classes-1].")] = _D["target"],
    kappa: Annotated[float, _opt("Input-gradient penalty strength, >= 0 (scale set by --penalty).")] = _D["kappa"],
    penalty: Annotated[Penalty, _opt("listing1: kappa*sum||grad_x mean CE||^2 (paper's code); eq25: kappa/2*mean||grad_x l_i||^2.")] = _D["penalty"],
    augment: Annotated[bool, _opt("Random crop + horizontal flip, batched on the device.")] = _D["augment"],
    crop_padding: Annotated[int | None, _opt("Zero padding of the random crop in px [default: 4, or 1 on 8x8].", min=0)] = None,
    epochs: Annotated[int, _opt("Training epochs, >= 1.")] = _D["epochs"],
    lr: Annotated[float | None, _opt("SGD learning rate [default: 0.1 for preresnet, 0.01 otherwise].")] = None,
    momentum: Annotated[float, _opt("SGD momentum, in [0, 1).")] = _D["momentum"],
    weight_decay: Annotated[float, _opt("L2 weight decay, in [0, 1].")] = _D["weight_decay"],
    lr_decay: Annotated[float, _opt("Multiplicative LR drop, in (0, 1].")] = _D["lr_decay"],
    lr_drops: Annotated[int, _opt("Number of equally spaced LR drops (2: every epochs/3).")] = _D["lr_drops"],
    batch_size: Annotated[int | None, _opt("Training batch size [default: 32 on digits, else 128].", min=1)] = None,
    eval_batch_size: Annotated[int, _opt("Batch size for evaluation and Hessian products.", min=1)] = _D["eval_batch_size"],
    seed: Annotated[int, _opt("Seed of init, shuffling, augmentation and poisoning.", min=0)] = _D["seed"],
    device: Annotated[str, _opt("auto | cpu | cuda | cuda:N.")] = _D["device"],
    hessian: Annotated[bool, _opt("Input-Hessian spectrum and trigger overlap after training.")] = _D["hessian"],
    hessian_split: Annotated[HessianSplit, _opt("Data averaged into H (auto: clean-train if stochastic, poisoned-train if deterministic).")] = _D["hessian_split"],
    hessian_samples: Annotated[int, _opt("At most this many samples averaged into H.", min=1)] = _D["hessian_samples"],
    hessian_iterations: Annotated[int, _opt("Lanczos iterations (paper: 10).", min=1)] = _D["hessian_iterations"],
    hessian_top_k: Annotated[int, _opt("Eigenpairs kept, <= iterations.", min=1)] = _D["hessian_top_k"],
    hessian_method: Annotated[HessianMethod, _opt("Hessian-vector product; gauss-newton (J^T S J) is exact on our piecewise-linear nets; auto = double-backward.")] = _D["hessian_method"],
    hessian_dtype: Annotated[DType, _opt("Precision of the spectrum computation.")] = _D["hessian_dtype"],
    spectrum_every: Annotated[int, _opt("Also measure the spectrum every N epochs (0: only at the end).", min=0)] = _D["spectrum_every"],
    geometry: Annotated[bool, _opt("Penultimate-feature geometry table (Appendix B).")] = _D["geometry"],
    config: Annotated[Path | None, _opt("YAML/JSON file of trial fields; explicit flags override it.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write {config, metrics, status, history} here.")] = None,
    checkpoint: Annotated[Path | None, _opt("Checkpoint file: written every epoch, resumed from if it exists.")] = None,
    overwrite: Annotated[bool, _opt("Allow --json to replace an existing file.")] = False,
    quiet: Annotated[bool, _opt("No progress bar.")] = False,
) -> dict[str, Any]:
    """Run one trial locally: poison, train with the penalty, evaluate, analyse."""
    params = {k: v for k, v in ctx.params.items()
              if k not in ("config", "json_path", "checkpoint", "overwrite", "quiet")}
    cfg = config_from_cli(ctx, params, config)
    if json_path is not None:
        _check_writable(json_path, overwrite)
    from .progress import run_with_progress

    result = run_with_progress(cfg, checkpoint=checkpoint, quiet=quiet)
    if json_path is not None:
        from trainables.train import write_json

        write_json(result, json_path)
    _print_summary(result)
    return result.to_json_dict()


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SweeperError(f"--json {path} already exists; refusing to overwrite it (pass --overwrite)")
    if path.exists() and path.is_dir():
        raise SweeperError(f"--json {path} is a directory, expected a file path")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise SweeperError(f"--json {path}: folder {parent} does not exist")


def _print_summary(result) -> None:
    m = result.metrics
    keys = [k for k in ("clean_acc", "asr", "train_acc", "n_poisoned", "penalty", "fisher_trace",
                        "lambda_1", "eig_gap", "overlap_sq", "max_overlap_sq", "max_overlap_index",
                        "train_seconds") if k in m]
    line = "  ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys)
    status = result.status + (f" at epoch {result.diverged_epoch}" if result.diverged_epoch else "")
    typer.echo(f"status={status}  {line}")


def _given_value(argv: list[str], param) -> str:
    """`` (got 'abc')`` for the option a parse error is about, so the message names the value."""
    for opt in getattr(param, "opts", None) or ():
        for i, tok in enumerate(argv):
            if tok == opt and i + 1 < len(argv):
                return f" (got {argv[i + 1]!r})"
            if tok.startswith(opt + "="):
                return f" (got {tok.split('=', 1)[1]!r})"
    return ""


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors and exit code 2 for any bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=argv, standalone_mode=False)
    except _click_exc.NoArgsIsHelpError:
        return 2  # help was printed
    except _click_exc.UsageError as e:
        where = f" (sweeper {e.ctx.info_name})" if e.ctx is not None and e.ctx.info_name != "sweeper" else ""
        given = _given_value(argv, getattr(e, "param", None))
        typer.echo(f"sweeper: error{where}: {_one_line(e.format_message())}{given}", err=True)
        return 2
    except typer.Abort:
        typer.echo("sweeper: aborted", err=True)
        return 130
    except (typer.Exit, _click_exc.ClickException) as e:
        return getattr(e, "exit_code", 1)
    except SweeperError as e:
        typer.echo(f"sweeper: error: {_one_line(str(e))}", err=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
