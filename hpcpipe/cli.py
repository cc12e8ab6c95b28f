"""The ``hpcpipe`` command line. Thin: parse, call the library, print.

Heavy libraries (torch, dask, pandas, transformers) are imported only inside the commands that
need them, so ``hpcpipe --help`` and ``hpcpipe status`` answer at once.
"""

from __future__ import annotations

import errno
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hpcpipe.errors import HpcpipeError

STEP_NAMES = ("ingest", "features", "train")


class _Group(click.Group):
    """Turns hpcpipe's own errors into a one-paragraph message and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpcpipeError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a folder the user cannot write, a full disk: say which
            raise click.ClickException(os_error_message(exc)) from None


def os_error_message(exc: OSError) -> str:
    """What went wrong with which file, and what to do, for an error of the file system."""
    where = f": {exc.filename}" if exc.filename else ""
    what = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        owner = _owner(exc.filename)
        return (f"{what}{where}{owner}. hpcpipe needs to write there: use a run or runs folder "
                "of your own (--runs-dir or HPCPIPE_RUNS_DIR), or ask its owner")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and "Free space" not in what:
        return f"{what}{where}. Free space (or quota) there and try again"
    return f"{what}{where}"


def _owner(path: Any) -> str:
    from hpcpipe.users import user_name

    p = Path(str(path)) if path else None
    while p is not None and not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f" (owned by {user_name(p.stat().st_uid)})" if p is not None else ""
    except OSError:
        return ""


def runs_dir_option(fn: Callable) -> Callable:
    @click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path),
                  envvar="HPCPIPE_RUNS_DIR", default=Path("runs"), show_default=True,
                  help="Folder holding the run folders (env HPCPIPE_RUNS_DIR).")
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def _open_run(runs_dir: Path, run: str | None):  # noqa: ANN202 - Run, imported lazily
    from hpcpipe.run.folder import Run

    return Run.open(runs_dir, run)


def _regex(value: str | None) -> str | None:
    import re

    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise click.BadParameter(f"{value!r} is not a valid regular expression ({exc}); "
                                     "quote it for the shell, or escape special characters "
                                     "with a backslash (e.g. \\[)") from None
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcpipe")
def main() -> None:
    """hpcpipe: one command runs the review-features + training pipeline on Slurm.

    \b
    Typical use on a cluster:
      hpcpipe submit --cpus 32 --gpus 2   # queue ingest -> features -> train, return at once
      hpcpipe status                      # state of each step of the latest run
      hpcpipe logs train -f               # follow the training log, across requeues
      hpcpipe summarize                   # what happened, what went wrong, what to do next
      hpcpipe rerun train                 # resubmit one step in place; it resumes its work

    Without Slurm (no sbatch on PATH) or with --local, the same steps run on this machine
    as background processes, on a synthetic sample when no input is configured.
    """


# ---------------------------------------------------------------------------------------------
# submit


@main.command()
@click.option("--cpus", type=click.IntRange(min=1), help="CPUs for the Dask features job.")
@click.option("--gpus", type=click.IntRange(min=1), help="GPUs (DDP ranks) for training.")
@click.option("--gpus-per-node", type=click.IntRange(min=1),
              help="GPUs per node; training uses ceil(gpus / gpus-per-node) nodes.")
@click.option("--partition", help="Slurm partition (default: the cluster's default).")
@click.option("--account", help="Slurm account to charge.")
@click.option("--time", "time_limit", help="Time limit for every step, e.g. 04:00:00 or 1-00:00:00.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML config (default: configs/default.yaml, or configs/local.yaml locally).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.epochs=5 (repeatable).")
@click.option("--steps", help="Comma-separated steps to run, from the start: ingest,features,train.")
@click.option("--name", help="Name prefix of the run id.")
@click.option("--dry-run", is_flag=True, help="Print the scripts and sbatch commands; submit nothing.")
@click.option("--local", is_flag=True, help="Run on this machine even where Slurm is available.")
@click.option("--wait", is_flag=True,
              help="Stay until the run ends, printing state changes; exit 1 if a step fails.")
@runs_dir_option
def submit(cpus: int | None, gpus: int | None, gpus_per_node: int | None, partition: str | None,
           account: str | None, time_limit: str | None, config_file: Path | None,
           overrides: tuple[str, ...], steps: str | None, name: str | None, dry_run: bool,
           local: bool, wait: bool, runs_dir: Path) -> None:
    """Submit the pipeline: ingest -> features (Dask) -> train (DDP), chained with afterok.

    Creates runs/<run-id>/ with the resolved config, the rendered sbatch scripts and a state
    file, submits every step with `sbatch --parsable`, prints the run id and job ids, and exits.
    Precedence: config file < these options < --set.
    """
    from hpcpipe import config, packaged
    from hpcpipe.control import pipeline
    from hpcpipe.scheduler import choose_backend
    from hpcpipe.watch.refresh import wait as wait_for_run

    backend = choose_backend(local)
    if config_file is None:
        config_file = packaged.default_config(local=backend == "local")
    flags: list[str] = []
    if cpus is not None:
        flags.append(f"features.cpus={cpus}")
    if gpus is not None:
        flags.append(f"train.gpus={gpus}")
    if gpus_per_node is not None:
        flags.append(f"train.gpus_per_node={gpus_per_node}")
    for key, value in (("slurm.partition", partition), ("slurm.account", account),
                       ("name", name)):
        if value is not None:
            flags.append(f"{key}={json.dumps(value)}")
    if time_limit is not None:
        flags += [f"{s}.time={json.dumps(time_limit)}" for s in STEP_NAMES]
    if steps is not None:
        flags.append(f"steps={json.dumps([s.strip() for s in steps.split(',') if s.strip()])}")
    cfg = config.load_config(config_file, [*flags, *overrides])
    if backend == "local" and not local:
        click.echo("sbatch is not on PATH: running locally (use --local to say so explicitly)",
                   err=True)
    run = pipeline.submit(cfg, backend_name=backend, runs_dir=runs_dir, dry_run=dry_run,
                          echo=click.echo)
    if run is None:
        return
    click.echo(f"run {run.run_id} ({backend}): {run.layout.root}")
    for step in run.steps():
        rec = run.job(step)
        after = f" (after {', '.join(rec.depends_on)})" if rec.depends_on else ""
        click.echo(f"  {step:<9} job {rec.job_id}{after}")
    if wait:
        ok = wait_for_run(run, click.echo)
        if not ok:
            raise click.ClickException(f"run {run.run_id} did not complete; see "
                                       f"`hpcpipe summarize {run.run_id}`")
    else:
        click.echo(f"watch it with: hpcpipe status {run.run_id}")


# ---------------------------------------------------------------------------------------------
# watching


@main.command()
@click.argument("run", required=False)
@click.option("--watch", is_flag=True, help="Redraw in place until the run ends.")
@click.option("--interval", type=click.FloatRange(min=2.0), default=5.0, show_default=True,
              help="Seconds between refreshes with --watch (at least 2).")
@click.option("--json", "as_json", is_flag=True, help="Print the steps as JSON.")
@runs_dir_option
def status(run: str | None, watch: bool, interval: float, as_json: bool, runs_dir: Path) -> None:
    """State of each step of RUN (default: the latest run): job id, state, elapsed, nodes,
    the reason a job is pending (Resources, Dependency, DependencyNeverSatisfied), and the
    ids of earlier jobs of the step.

    One batched squeue and at most one batched sacct call per refresh; ended jobs are cached
    in the run's state file and need no scheduler call. Works where sacct is disabled.
    """
    from hpcpipe.watch import status as status_mod
    from hpcpipe.watch.refresh import refresh, run_finished

    r = _open_run(runs_dir, run)
    while True:
        note = refresh(r)
        if as_json:
            click.echo(json.dumps({"run": r.run_id, "backend": r.backend_name, "note": note,
                                   "steps": status_mod.step_rows(r)}, indent=2))
        else:
            text = status_mod.format_table(r, note)
            if watch:
                click.echo("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + text)
            else:
                click.echo(text)
        if not watch or run_finished(r):
            return
        time.sleep(interval)


@main.command()
@runs_dir_option
def runs(runs_dir: Path) -> None:
    """List the runs in the runs folder, oldest first, with each step's last known state."""
    from hpcpipe.errors import RunError
    from hpcpipe.run.folder import Run, list_runs, read_state

    found = list_runs(runs_dir)
    if not found:
        click.echo(f"no runs in {runs_dir.resolve()}")
        return
    for root in found:
        try:
            r = Run(root, read_state(root / "state.json"))
        except (OSError, RunError) as exc:
            click.echo(f"{root.name}  damaged: {exc}")
            continue
        steps = "  ".join(f"{s}:{rec.state}" for s in r.steps() if (rec := r.current(s)))
        click.echo(f"{r.run_id}  {r.backend_name:<5}  {r.state.created}  {steps}")


@main.command()
@click.argument("step", type=click.Choice(STEP_NAMES))
@click.argument("run", required=False)
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new lines, across requeues and reruns, until the step ends.")
@click.option("--rank", type=click.IntRange(min=0), help="Only lines of this srun task (rank).")
@click.option("--grep", "pattern", callback=lambda ctx, param, v: _regex(v),
              help="Only lines matching this regular expression.")
@runs_dir_option
def logs(step: str, run: str | None, follow: bool, rank: int | None, pattern: str | None,
         runs_dir: Path) -> None:
    """Print (or follow with -f) the log of STEP in RUN (default: the latest run).

    Logs are at logs/<run-id>/<step>-<jobid>.out; progress-bar redraws are collapsed.
    """
    from hpcpipe.watch import logs as logs_mod

    r = _open_run(runs_dir, run)
    try:
        logs_mod.show(r, step, click.echo, follow, logs_mod.LineFilter(rank, pattern))
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("run", required=False)
@click.option("--plot", is_flag=True, help="Also write summary.png (loss, validation, throughput).")
@runs_dir_option
def summarize(run: str | None, plot: bool, runs_dir: Path) -> None:
    """Report on RUN (default: the latest): per step state, elapsed, queue wait, CPU efficiency,
    memory, throughput, the training curve against the naive baselines, and a diagnosis of what
    went wrong with the evidence line and the next thing to do. Also written to summary.md."""
    from hpcpipe import files
    from hpcpipe.watch import summary
    from hpcpipe.watch.refresh import refresh

    r = _open_run(runs_dir, run)
    note = refresh(r)
    with r.try_lock() as locked:
        if locked:  # re-read under the lock so a rerun's new jobs are never written over
            r.reload()
        summary.refresh_accounting(r)
        if locked:
            r.save()
    text = summary.build_report(r)
    if note:
        text += f"\nnote: {note}\n"
    try:
        files.write_text(r.layout.summary, text)
    except OSError as exc:  # someone else's run: the report is still worth printing
        text += f"\nnote: summary.md not written ({os_error_message(exc)})\n"
    click.echo(text)
    if plot:
        from hpcpipe.watch import plot as plot_mod

        click.echo(f"plot: {plot_mod.write_plot(r)}")


# ---------------------------------------------------------------------------------------------
# changing a run


@main.command()
@click.argument("run_or_step", required=False)
@click.argument("step", required=False, type=click.Choice(STEP_NAMES))
@runs_dir_option
def cancel(run_or_step: str | None, step: str | None, runs_dir: Path) -> None:
    """Cancel a whole run, or one STEP and the steps after it, in one scancel call.

    \b
    hpcpipe cancel                 # every unfinished job of the latest run
    hpcpipe cancel train           # the train step of the latest run
    hpcpipe cancel RUN features    # features and train of RUN
    """
    from hpcpipe.control import pipeline

    run = run_or_step
    if run_or_step in STEP_NAMES and step is None:
        run, step = None, run_or_step
    r = _open_run(runs_dir, run)
    ids = pipeline.cancel(r, step)
    click.echo(f"cancelled {', '.join(ids)}" if ids else "nothing to cancel: no job is queued "
               "or running")


@main.command()
@click.argument("step", type=click.Choice(STEP_NAMES))
@click.argument("run", required=False)
@click.option("--downstream/--no-downstream", default=True, show_default=True,
              help="Also resubmit the later steps behind the new job; a completed one ends at "
                   "once if its input did not change, and recomputes if the rerun changed it.")
@click.option("--cancel-first", is_flag=True, help="Cancel the step's job if it is still running.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a config key for this and later submissions of the run. Checked "
                   "like submit (keys, paths, the cluster's layout) before anything is cancelled "
                   "or queued; a refused value leaves the run's config as it was.")
@click.option("--fresh", is_flag=True,
              help="train only: train from scratch; the old checkpoints are moved aside to "
                   "train/checkpoints.<time>/, not deleted.")
@runs_dir_option
def rerun(step: str, run: str | None, downstream: bool, cancel_first: bool,
          overrides: tuple[str, ...], fresh: bool, runs_dir: Path) -> None:
    """Resubmit STEP in RUN's folder (default: the latest run); the step resumes its work
    (features keeps finished buckets, train continues from its last checkpoint).

    train does not continue a checkpoint computed from other data or settings (features
    recomputed from other input; another train.lr, epochs, global batch, model...): the job
    fails saying what changed. `rerun train --fresh` then trains from scratch, the old
    checkpoints moved aside. Settings that do not change the result (train.time, mem,
    num_workers, gpus with the same global batch) resume.

    \b
    hpcpipe rerun train --set train.time=04:00:00     # more time: resumes
    hpcpipe rerun train --fresh --set train.lr=3e-4   # other settings: start over
    """
    from hpcpipe.control import pipeline

    r = _open_run(runs_dir, run)
    new = pipeline.rerun(r, step, downstream=downstream, cancel_first=cancel_first,
                         overrides=list(overrides), echo=click.echo, fresh=fresh)
    for s, jid in new.items():
        click.echo(f"  {s:<9} job {jid}")


@main.command()
@click.argument("run", required=False)
@runs_dir_option
def predict(run: str | None, runs_dir: Path) -> None:
    """Write predictions from RUN's best checkpoint to runs/<run-id>/predictions.parquet: the
    number of reviews in the week after the data's last week (forecast_week), for every product
    with reviews in that last week (the others have no features to forecast from). The file's
    metadata says which weeks and how many products were left out."""
    from hpcpipe.steps.train.predict import predict as do_predict

    r = _open_run(runs_dir, run)
    path = do_predict(r.layout, r.load_config())
    click.echo(f"predictions: {path}")


# ---------------------------------------------------------------------------------------------
# the site


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
@click.option("--probe-job", is_flag=True,
              help="Also run a 1-minute job that reports what a compute node sees: Python, "
                   "torch and its CUDA, scontrol.")
@click.option("--probe-timeout", type=click.FloatRange(min=10), default=300, show_default=True,
              help="Seconds to wait for the probe job before cancelling it.")
def doctor(as_json: bool, probe_job: bool, probe_timeout: float) -> None:
    """Probe this Slurm cluster and say what hpcpipe does differently because of it.

    Slurm version, accounting, select plugin and GPU request form, nodes and partitions
    (CPUs, memory, GPUs, MaxTime, MaxNodes), MaxArraySize, JobFileAppend, preemption; the
    facts are cached per cluster under $XDG_CACHE_HOME/hpcpipe/ (default ~/.cache/hpcpipe/),
    and submit and rerun render their scripts from them.

    \b
    Example:
      hpcpipe doctor               # facts and consequences
      hpcpipe doctor --probe-job   # and what a compute node sees
    """
    from hpcpipe.scheduler import site

    facts, cached = site.doctor(probe_job=probe_job, probe_timeout_s=probe_timeout)
    if as_json:
        click.echo(json.dumps({**facts.to_dict(), "cache": str(cached) if cached else None,
                               "consequences": [{"fact": f, "hpcpipe": a}
                                                for f, a in site.explain(facts)]}, indent=2))
    else:
        click.echo(site.report(facts, cached))


# ---------------------------------------------------------------------------------------------
# data


@main.group()
def data() -> None:
    """Make or inspect input data."""


@data.command()
@click.option("--reviews", type=click.IntRange(min=1, max=400_000_000), required=True,
              help="Number of reviews to write.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (gets reviews.* and meta.*).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--products", type=click.IntRange(min=1), help="Number of products (default ~N/80).")
@click.option("--format", "fmt", type=click.Choice(["jsonl.gz", "jsonl", "parquet"]),
              default="jsonl.gz", show_default=True, help="File format.")
@click.option("--files", type=click.IntRange(min=1, max=16), default=1, show_default=True,
              help="Reviews files, split by category like Amazon Reviews'23's per-category files.")
@click.option("--sizes", type=click.Choice(["realistic", "compact"]), default="realistic",
              show_default=True,
              help="realistic: ~53-word texts with a long tail, image lists, full metadata; "
              "compact: short texts, as the pipeline's own sample.")
def synth(reviews: int, out: Path, seed: int, products: int | None, fmt: str, files: int,
          sizes: str) -> None:
    """Write a synthetic data set in the Amazon Reviews'23 layout: categories in the product
    titles, seasonality by category, launch/decay curves, Zipf popularity. Deterministic.

    Example:

        hpcpipe data synth --reviews 1000000 --files 4 --out data/synth
    """
    from hpcpipe.steps.synth import write_synthetic

    result = write_synthetic(out, reviews, seed=seed, n_products=products, fmt=fmt, files=files,
                             sizes=sizes)
    click.echo(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
