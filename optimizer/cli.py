"""The ``abopt`` command line: parses arguments and prints; the work lives in the modules."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import click
from rich.console import Console

from optimizer import DATA, __version__
from optimizer.blas import ensure_fast_blas
from optimizer.errors import UserError, disk_full_message
from optimizer.study.stopping import Stopped, handle_stop_signals

BUNDLED_DEMO = DATA / "studies" / "demo.toml"


class _Group(click.Group):
    """Turns a UserError or a full disk anywhere below into one line on stderr and exit code 2,
    and a stop request (Ctrl-C, SIGTERM...) outside a run into its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"abopt: error: {error}", err=True)
            sys.exit(2)
        except Stopped as stop:
            click.echo(f"abopt: stopped ({stop.reason})", err=True)
            sys.exit(stop.exit_code)
        except Exception as error:
            message = disk_full_message(error)
            if message is None:
                raise
            click.echo(f"abopt: error: {message}", err=True)
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
    """The study config and its storage URL. No file means the bundled demo: in a checkout
    of abopt, the studies/demo.toml that ./scripts/demo runs (with its own studies/demo.db);
    anywhere else, stored in ./demo.db."""
    from optimizer.study.config import load_study, storage_url_for

    if study_file is None:
        checkout_demo = Path("studies") / "demo.toml"
        if checkout_demo.is_file() and checkout_demo.samefile(BUNDLED_DEMO):
            config = load_study(checkout_demo)
            return config, storage_url_for(config, storage)
        config = load_study(BUNDLED_DEMO)
        return config, storage_url_for(config, storage or "sqlite:///demo.db")
    config = load_study(study_file)
    return config, storage_url_for(config, storage)


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@click.option("--n-trials", type=click.IntRange(min=1), help="Complete trials the study should reach (default: the study file's).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes on this machine.")
@click.option("--timeout", metavar="DURATION", help="Time budget, e.g. 90m or 8h: then stop (exit 0); the same command continues.")
@_study_option
@click.option("--as-worker", type=int, hidden=True)
def run(study_file: str | None, n_trials: int | None, workers: int, timeout: str | None, storage: str | None, as_worker: int | None) -> None:
    """Create or resume a study and run it (no STUDY.toml: the bundled demo, offline).

    Ctrl-C, SIGTERM, SIGHUP and --timeout stop within seconds: the running trial is failed
    and queued again, the front is printed, and the same command resumes.
    """
    from optimizer.browse.dashboard import trial_annotator
    from optimizer.browse.progress import Progress
    from optimizer.study.run import run_as_worker, run_study
    from optimizer.study.stopping import parse_duration

    seconds = parse_duration(timeout) if timeout is not None else None
    handle_stop_signals(seconds)
    config, storage_url = _load(study_file, storage)
    hooks = [trial_annotator(config, storage_url)]  # dashboard note and profile plot per trial
    if as_worker is not None:
        sys.exit(run_as_worker(config, storage_url, n_trials, as_worker, on_result=hooks))
    console = Console()
    console.print(f"study [bold]{config.name}[/] · model {config.model} · storage {_shown_url(storage_url)}")
    target = n_trials or config.optimization.n_trials
    result = run_study(
        config, storage_url, n_trials=n_trials, workers=workers, display=Progress(config.name, target, console=console),
        timeout=seconds, on_result=hooks,
    )
    _print_front(config, storage_url, console)
    again = f"  {shlex.join([command_hint('abopt'), *sys.argv[1:]])}"
    stop = result.stopped
    if stop is not None and stop.timed_out:
        console.print(f"time budget of {timeout} used up at {result.completed}/{result.target} complete trials; continue with:")
        console.print(again, soft_wrap=True, highlight=False)
        sys.exit(stop.exit_code)
    if stop is not None:
        console.print(f"interrupted ({stop.reason}) at {result.completed}/{result.target} complete trials; resume with:")
        console.print(again, soft_wrap=True, highlight=False)
        sys.exit(stop.exit_code)
    if result.completed < result.target:
        console.print(f"stopped at {result.completed}/{result.target} complete trials (see the messages above)")
        sys.exit(1)
    console.print(f"done: {result.completed} complete trials")


def command_hint(name: str) -> str:
    """How to type ``name`` (abopt's own console scripts) in the user's shell: the bare name
    when it is on PATH there, else its full path (e.g. a venv that is not activated)."""
    installed = Path(sys.executable).parent / name
    if not installed.exists():
        return name
    found = shutil.which(name)
    return name if found is not None and Path(found).resolve() == installed.resolve() else str(installed)


def _shown_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _print_front(config, storage_url: str, console: Console) -> None:
    from optimizer.browse.views import front_table
    from optimizer.study.storage import completed_count, find_study

    study = find_study(storage_url, config.name)
    if study is not None and completed_count(study):
        (console if console.is_terminal else _wide_console()).print(front_table(study))


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@_study_option
def measure(study_file: str | None, storage: str | None) -> None:
    """Measure the refusal directions only (cached in the study's storage) and print them per layer."""
    from optimizer.browse.views import directions_table
    from optimizer.study.plan import plan
    from optimizer.study.steered import load_steered

    config, storage_url = _load(study_file, storage)
    steered = load_steered(plan(config, storage_url))
    loaded, directions = steered.loaded, steered.directions
    console = Console()
    source = f"measured in {directions.seconds:.1f} s" if steered.measured else "from the study's cache"
    console.print(
        f"{loaded.model_type}, {loaded.n_layers} layers, hidden {loaded.hidden_size}: directions {source} "
        f"on {directions.n_harmful} harmful and {directions.n_harmless} harmless prompts"
    )
    console.print(directions_table(directions))


# --- browsing a study: front, show, report, dashboard (the work is in optimizer.browse) -------


def _open(study_file: str | None, storage: str | None):
    """The config, storage URL and existing study of a study file (UserError if none)."""
    from optimizer.study.storage import open_study

    config, storage_url = _load(study_file, storage)
    return config, storage_url, open_study(config.name, storage_url, study_file or "")


def _wide_console() -> Console:
    """A console for wide tables: the terminal's width, or 160 columns into a pipe or file."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list: the original model first (trial null), then the front.")
@_study_option
def front(study_file: str | None, as_json: bool, storage: str | None) -> None:
    """The Pareto front: the trials worth choosing from, lowest refusal rate first."""
    import json

    from optimizer.browse.views import front_records, front_table

    _, _, study = _open(study_file, storage)
    if as_json:
        click.echo(json.dumps(front_records(study), indent=2))
    else:
        _wide_console().print(front_table(study))


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="[STUDY.toml] TRIAL")
@click.option("--json", "as_json", is_flag=True, help="Print everything about the trial as JSON.")
@_study_option
def show(args: tuple[str, ...], as_json: bool, storage: str | None) -> None:
    """Everything about one trial: scores, parameters, per-layer weights, timings, sample answers."""
    import json

    from optimizer.browse.views import trial_json, trial_view
    from optimizer.study.record import read_confirmations, read_trial
    from optimizer.study.storage import complete_trial

    study_file, number, _ = _trial_args(args, "show [STUDY.toml] TRIAL")
    _, _, study = _open(study_file, storage)
    record = read_trial(complete_trial(study, number), read_confirmations(study))
    if as_json:
        click.echo(json.dumps(trial_json(study, record), indent=2))
    else:
        Console().print(trial_view(study, record))


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@click.option("--html", "html_file", required=True, type=click.Path(dir_okay=True, path_type=Path), metavar="FILE", help="The HTML file to write (self-contained, opens offline).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists (never the study's own database or study file).")
@_study_option
def report(study_file: str | None, html_file: Path, force: bool, storage: str | None) -> None:
    """Write the study as one HTML page: front, weight profiles, history, importances."""
    from optimizer.browse.report import write_report
    from optimizer.study.storage import sqlite_path

    config, storage_url, study = _open(study_file, storage)
    protected = [config.path, *filter(None, [sqlite_path(storage_url)])]
    size = write_report(study, html_file, force=force, protected=protected)
    click.echo(f"wrote {html_file} ({size / 1e6:.1f} MB); open it in any browser, no network needed")


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
@_study_option
def dashboard(study_file: str | None, port: int, storage: str | None) -> None:
    """Serve optuna-dashboard for the study on 127.0.0.1, with trial notes and profile plots."""
    from optimizer.browse.dashboard import (
        annotate_study,
        artifact_dir,
        artifact_store,
        dashboard_server,
        serve,
        study_url,
    )

    config, storage_url, study = _open(study_file, storage)
    store = artifact_store(artifact_dir(config, storage_url))
    server = dashboard_server(study._storage, store, port)
    added = annotate_study(study, store)
    if added:
        click.echo(f"added notes and profile plots to {added} trial(s) that had none")
    click.echo(f"optuna-dashboard for study {config.name!r}: {study_url(server, study)}")
    click.echo(f"artifacts: {artifact_dir(config, storage_url)} · stop with Ctrl-C")
    serve(server)
    click.echo("dashboard stopped")


# --- using a trial: export and chat (the work is in export.py, chat.py, trial_model.py) ---


def _trial_args(args: tuple[str, ...], usage: str, extra: int = 0) -> tuple[str | None, int, tuple[str, ...]]:
    """Split ``[STUDY.toml] TRIAL`` plus ``extra`` trailing arguments."""
    head, tail = args[: len(args) - extra], args[len(args) - extra :]
    if len(head) not in (1, 2) or not head[-1].isdigit():
        raise UserError(f"expected {usage} with TRIAL a trial number, got {' '.join(args)!r}; e.g. abopt {usage.replace('[STUDY.toml]', 'study.toml').replace('TRIAL', '12')}")
    return (head[0] if len(head) == 2 else None), int(head[-1]), tail


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="[STUDY.toml] TRIAL OUT_DIR")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="Float dtype of the rewritten float tensors (default: the source's).")
@click.option("--quantize", type=click.Choice(["keep", "none"]), default="keep", show_default=True, help="Edited quantized matrices: re-quantize them as they were, or store them dense.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists (only once the new export is verified).")
@_study_option
def export(args: tuple[str, ...], dtype: str | None, quantize: str, force: bool, storage: str | None) -> None:
    """Bake a trial's steering into the weights, verify the result, and write it to OUT_DIR."""
    from optimizer.export.edit import ExportOptions
    from optimizer.export.publish import export_trial
    from optimizer.study.plan import plan

    study_file, number, (out_dir,) = _trial_args(args, "export [STUDY.toml] TRIAL OUT_DIR", extra=1)
    config, storage_url, study = _open(study_file, storage)
    try:
        result = export_trial(
            plan(config, storage_url),
            study,
            number,
            out_dir,
            ExportOptions(dtype=dtype, quantize=quantize, force=force),
            log=click.echo,
        )
    except KeyboardInterrupt:
        click.echo(f"abopt: export interrupted; nothing was written to {out_dir}", err=True)
        sys.exit(130)
    w, seconds = result.write, result.seconds
    click.echo(
        f"trial {number} exported to {result.out_dir}: {len(w.edited)} tensors edited in "
        f"{len(w.files) - len(w.copied_files)}/{len(w.files)} weight files, {w.total_size / 1e6:.1f} MB "
        f"({seconds['reference']:.1f} s loading and reference logits, {seconds['write']:.1f} s writing, "
        f"{seconds['verify']:.1f} s verifying)"
    )
    click.echo(f"try it: {shlex.join([command_hint('mlx_lm.generate'), '--model', str(result.out_dir), '--prompt', 'Hello'])}")


@cli.command()
@click.argument("args", nargs=-1, required=True, metavar="[STUDY.toml] TRIAL")
@click.option("--prompt", help="Answer this one prompt and exit (default: interactive).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Longest answer, in tokens.")
@_study_option
def chat(args: tuple[str, ...], prompt: str | None, max_tokens: int, storage: str | None) -> None:
    """The original and the trial-steered model answer side by side (runtime steering, greedy)."""
    from optimizer.browse.chat import exchange_table, side_by_side
    from optimizer.study.plan import plan
    from optimizer.study.steered import load_trial_model

    study_file, number, _ = _trial_args(args, "chat [STUDY.toml] TRIAL")
    config, storage_url, study = _open(study_file, storage)
    console = _wide_console()
    trial_model = load_trial_model(plan(config, storage_url), study, number)
    if prompt is not None:
        console.print(exchange_table(side_by_side(trial_model, prompt, max_tokens=max_tokens), number))
        return
    console.print(f"chatting with {config.model}, original vs trial {number}; an empty line or Ctrl-D ends")
    while True:
        try:
            text = click.prompt("you", default="", show_default=False, prompt_suffix="> ")
        except (EOFError, KeyboardInterrupt, click.exceptions.Abort):
            break
        if not text.strip():
            break
        console.print(exchange_table(side_by_side(trial_model, text, max_tokens=max_tokens), number))


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@click.option("--trials", "which", default="front", show_default=True, metavar="front|all|N,M,...", help="Which complete trials to confirm.")
@_study_option
def confirm(study_file: str | None, which: str, storage: str | None) -> None:
    """Score trials again on long answers with the study's judge: refusals, over-refusal, damage.

    Trials entering the front are confirmed as a study runs; this confirms others (or those
    of a study run before confirmation), each once, whoever asks.
    """
    from optimizer.browse.views import confirmations_table
    from optimizer.study.confirm import confirm_trials, trial_numbers
    from optimizer.study.plan import open_existing, plan

    config, storage_url = _load(study_file, storage)
    study_plan = plan(config, storage_url)
    if not config.evaluation.confirm_tokens:
        raise UserError(f"{config.path.name} sets confirm_tokens = 0 (no confirmation); set it, e.g. to 128")
    study = open_existing(study_plan)
    confirmations = confirm_trials(study_plan, study, trial_numbers(study, which), log=click.echo)
    _wide_console().print(confirmations_table(study, confirmations))


@cli.command()
@click.argument("study_file", required=False, metavar="[STUDY.toml]")
@click.option("--input", "input_file", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.jsonl", help='One {"prompt": ..., "answer": ...} per line (a "label" too, to measure accuracy).')
def judge(study_file: str | None, input_file: Path) -> None:
    """The study's judge on your own answers: one JSON line per answer, a summary on stderr.

    Audit a judge on examples you know before trusting a long study to it.
    """
    import json

    from optimizer.engine.judge import judge_file

    config, _ = _load(study_file, None)
    result = judge_file(input_file, config.evaluation.judge, config.evaluation.judge_template or None, config.evaluation.markers, config.base_dir)
    for line in result.lines:
        click.echo(json.dumps(line, ensure_ascii=False))
    click.echo(result.summary(), err=True)


@cli.command()
@click.argument("model", required=False, default="organism", metavar="[MODEL]")
@click.option("--synthetic", metavar="ARCH:SIZE", help="A random-weight model of a real architecture instead, e.g. llama:100M.")
@click.option("--n-eval", type=click.IntRange(min=1), default=64, show_default=True, help="Eval prompts of each kind.")
@click.option("--n-measure", type=click.IntRange(min=2), default=128, show_default=True, help="Measure prompts of each kind.")
@click.option("--trials", type=click.IntRange(min=1), default=10, show_default=True, help="Timed trials, each followed by its floor.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--kl-tokens", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=0), default=0, show_default=True, help="0: sized to memory.")
@click.option("--quantize", type=click.Choice(["0", "2", "3", "4", "5", "6", "8"]), default="0", show_default=True, help="Quantize the model to BITS in memory first.")
@click.option("--memory-trials", type=click.IntRange(min=0), default=0, show_default=True, metavar="N", help="Then run N more trials and report memory along the way.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--system-prompt", default="", metavar="TEXT", help="A system turn before every prompt (a chat template's shared prefix grows with it).")
@click.option("--judge", default="markers", show_default=True, metavar="JUDGE", help='"markers", "bundled", or a judge model (path or HF id): its share of a trial is reported.')
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def bench(model: str, synthetic: str | None, quiet: bool, quantize: str, **settings) -> None:
    """Time trials against plain mlx-lm doing the same forward work (MODEL: path, HF id or 'organism').

    The last line is floor_ratio=<x>: trial time divided by that floor.
    """
    from optimizer.bench.benchmark import format_report, run_benchmark

    def log(line: str) -> None:
        if not quiet:
            click.echo(f"bench: {line}", err=True)

    result = run_benchmark(model, synthetic=synthetic, quantize=int(quantize), log=log, **settings)
    click.echo(format_report(result))


def main() -> None:
    """Console-script entry point."""
    ensure_fast_blas()
    # A shell starts background jobs with SIGINT ignored, and Python keeps that; abopt
    # always wants Ctrl-C (or kill -INT), SIGTERM and SIGHUP to stop a command cleanly.
    handle_stop_signals()
    cli()
