"""The ``abopt`` command line: parses arguments and prints; the work lives in the modules."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import click
from rich.console import Console

from optimizer import __version__
from optimizer.errors import UserError
from optimizer.runtime import ensure_fast_blas

BUNDLED_DEMO = Path(__file__).parent / "data" / "studies" / "demo.toml"


class _Group(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"abopt: error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="abopt")
def cli() -> None:
    """Optimize abliteration of MLX chat models with Optuna.

    Start with `abopt run` (the bundled demo), then `abopt front`.
    """


def _study_option(function):
    return click.option(
        "--storage",
        metavar="URL",
        help="Study storage (sqlite:///PATH.db or postgresql://USER@HOST/DB); default: the study file's.",
    )(function)


def _load(study_file: str | None, storage: str | None):
    """The study config and its storage URL; no file means the bundled demo, stored in ./demo.db."""
    from optimizer.config import load_study, storage_url_for

    if study_file is None:
        config = load_study(BUNDLED_DEMO)
        return config, storage_url_for(config, storage or "sqlite:///demo.db")
    config = load_study(study_file)
    return config, storage_url_for(config, storage)


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@click.option("--n-trials", type=click.IntRange(min=1), help="Complete trials the study should reach (default: the study file's).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes on this machine.")
@_study_option
@click.option("--as-worker", is_flag=True, hidden=True)
def run(study_file: str | None, n_trials: int | None, workers: int, storage: str | None, as_worker: bool) -> None:
    """Create or resume a study and run it (no STUDY.toml: the bundled demo, offline)."""
    from optimizer.run import INTERRUPTED, run_as_worker, run_study
    from optimizer.progress import Progress

    config, storage_url = _load(study_file, storage)
    if as_worker:
        sys.exit(INTERRUPTED if run_as_worker(config, storage_url, n_trials) else 0)
    console = Console()
    console.print(f"study [bold]{config.name}[/] · model {config.model} · storage {_shown_url(storage_url)}")
    result = run_study(config, storage_url, n_trials=n_trials, workers=workers, progress=Progress(config.name, console=console))
    _print_front(config, storage_url, console)
    if result.interrupted:
        console.print(f"interrupted at {result.completed}/{result.target} complete trials; resume with:")
        console.print(f"  abopt {shlex.join(sys.argv[1:])}", soft_wrap=True, highlight=False)
        sys.exit(INTERRUPTED)
    if result.completed < result.target:
        console.print(f"stopped at {result.completed}/{result.target} complete trials (see the messages above)")
        sys.exit(1)
    console.print(f"done: {result.completed} complete trials")


def _shown_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _print_front(config, storage_url: str, console: Console) -> None:
    import optuna

    from optimizer.front import baseline, pareto_front
    from optimizer.progress import trade_offs_table
    from optimizer.study import find_study, make_storage

    study = find_study(make_storage(storage_url), config.name)
    if study is None:
        return
    base = baseline(study)
    if base:
        console.print(
            f"baseline (untouched model): refusals {100 * base['refusal_rate']:.1f}% "
            f"({base['refused']}/{base['total']}), KL 0"
        )
    front = pareto_front(study) if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) else []
    if front:
        console.print(trade_offs_table(front, limit=len(front)))


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@_study_option
def measure(study_file: str | None, storage: str | None) -> None:
    """Measure the refusal directions only (cached in the study's storage) and print them per layer."""
    from optimizer.cache import OnceStore
    from optimizer.directions import cached_directions
    from optimizer.model import load_model
    from optimizer.study import plan

    config, storage_url = _load(study_file, storage)
    study_plan = plan(config, storage_url)
    loaded = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    directions, measured = cached_directions(
        OnceStore(storage_url),
        loaded,
        study_plan.prompts.harmful_measure,
        study_plan.prompts.harmless_measure,
        system_prompt=config.prompts.system_prompt,
        batch_size=config.evaluation.batch_size or 32,
    )
    console = Console()
    source = f"measured in {directions.seconds:.1f} s" if measured else "from the study's cache"
    console.print(
        f"{loaded.model_type}, {loaded.n_layers} layers, hidden {loaded.hidden_size}: directions {source} "
        f"on {directions.n_harmful} harmful and {directions.n_harmless} harmless prompts"
    )
    console.print(directions_table(directions))


def directions_table(directions):
    """Per-layer separation as a table with a bar."""
    from rich.table import Table

    table = Table(title="refusal direction per layer", title_justify="left")
    for column in ("layer", "separation (d)", "‖mean gap‖", "cos(next)", ""):
        table.add_column(column, justify="right" if column else "left")
    top = float(directions.separation.max()) or 1.0
    vectors = directions.vectors
    for layer in range(directions.n_layers):
        d = float(directions.separation[layer])
        following = f"{float(vectors[layer] @ vectors[layer + 1]):.3f}" if layer + 1 < directions.n_layers else ""
        bar = "█" * max(0, round(20 * d / top))
        best = " ← best" if layer == directions.best_layer else ""
        table.add_row(str(layer), f"{d:.2f}", f"{float(directions.mean_gap[layer]):.3f}", following, bar + best)
    return table


def main() -> None:
    """Console-script entry point."""
    ensure_fast_blas()
    # A shell starts background jobs with SIGINT ignored, and Python keeps that; abopt
    # always wants Ctrl-C (or kill -INT) to stop a run cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli()
