"""`lmforge label ...`: the labelling app's admin commands and its server. Each command is a thin call into the
store (store.py), the candidates readers, the exporters or the app; the heavy imports wait until a command runs,
so `lmforge --help` stays fast."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import List, Optional

import typer

from lmforge import verbs
from lmforge.hosts import is_loopback

log = logging.getLogger(__name__)

label_app = typer.Typer(help="Label model outputs by hand: blind A/B comparison in a web app (docs/labelling.md).",
                        no_args_is_help=True)
user_app = typer.Typer(help="Annotators and admins: add, list, rotate a token, disable.", no_args_is_help=True)
project_app = typer.Typer(help="Projects of comparisons: from a file of candidates or preferences, or generated.",
                          no_args_is_help=True)
label_app.add_typer(user_app, name="user")
label_app.add_typer(project_app, name="project")

DB_ARG = typer.Argument(..., help="The label database (an SQLite file made by `lmforge label init`).")


def _store(db: Path, create: bool = False):  # -> LabelStore (imported here: sqlite only, but keep --help fast)
    from lmforge.label.store import LabelStore

    try:
        return LabelStore(db, create=create)
    except (FileNotFoundError, ValueError) as e:
        verbs.fail(str(e), 2)


def _report_skipped(what: str, skipped) -> None:
    if skipped.count:
        log.warning("%s: skipped %d bad records (%s); first: %s", what, skipped.count,
                    ", ".join(f"{k}: {n}" for k, n in skipped.by_reason.items()), "; ".join(skipped.examples))


@label_app.command()
def init(db: Path = DB_ARG) -> None:
    """Create an empty label database (an existing one is migrated to the current schema, never emptied)."""
    _store(db, create=True)
    log.info("label database ready: %s (next: lmforge label user add %s NAME --role admin)", db, db)


@user_app.command("add")
def user_add(db: Path = DB_ARG, name: str = typer.Argument(..., help="Login name (letters, digits, . _ -)."),
             role: str = typer.Option("annotator", help="annotator or admin (admins see results and exports)."),
             ) -> None:  # fmt: skip
    """Add a user and print their login token: it is shown this once (only its hash is stored)."""
    try:
        token = _store(db).add_user(name, role)
    except ValueError as e:
        verbs.fail(str(e), 2)
    typer.echo(token)


@user_app.command("list")
def user_list(db: Path = DB_ARG) -> None:
    """Every user with their role, and whether they are disabled."""
    for user in _store(db).users():
        typer.echo(f"{user.name}\t{user.role}" + ("\tdisabled" if user.disabled else ""))


@user_app.command("rotate")
def user_rotate(db: Path = DB_ARG, name: str = typer.Argument(..., help="The user whose token is replaced.")) -> None:
    """Print a new token for NAME; the old token and every session made with it stop working."""
    try:
        typer.echo(_store(db).rotate_token(name))
    except KeyError as e:
        verbs.fail(e.args[0], 2)


@user_app.command("disable")
def user_disable(db: Path = DB_ARG, name: str = typer.Argument(..., help="The user who can no longer log in.")) -> None:
    """NAME can no longer log in (their votes stay)."""
    try:
        _store(db).disable_user(name)
    except KeyError as e:
        verbs.fail(e.args[0], 2)
    log.info("disabled %s", name)


def _create(db: Path, name: str, items: list, k: int, attention: Optional[Path], seed: int) -> None:
    from lmforge.label.candidates import read_candidates

    checks = []
    if attention is not None:
        checks, skipped = read_candidates(attention)
        _report_skipped(str(attention), skipped)
    try:
        project = _store(db).create_project(name, items, k=k, attention=checks, seed=seed)
    except ValueError as e:
        verbs.fail(str(e), 2)
    log.info("project %s: %d items, %d comparisons, %d attention checks, %d annotators each", project.name,
             project.items, project.comparisons, project.attention, project.k)


K_OPTION = typer.Option(3, "--k", min=1, help="Distinct annotators per comparison.")
ATTENTION_OPTION = typer.Option(None, "--attention", help="Attention checks: a candidates or preference file whose "
                                "items have a known answer (every annotator gets each once).")
SEED_OPTION = typer.Option(0, help="Seed of the per-annotator A/B sides.")


@project_app.command("create")
def project_create(db: Path = DB_ARG, name: str = typer.Argument(..., help="The new project's name."),
                   items: Path = typer.Option(..., "--items", help="A candidates file (lmforge.label.candidates) or "
                                              "any preference file (hh-rlhf, TRL, PandaLM, lmforge)."),
                   k: int = K_OPTION, attention: Optional[Path] = ATTENTION_OPTION, seed: int = SEED_OPTION) -> None:
    """A project of comparisons from ready replies: one per item and pair of its replies."""
    from lmforge.label.candidates import read_candidates

    try:
        found, skipped = read_candidates(items)
    except (FileNotFoundError, ValueError) as e:
        verbs.fail(str(e), 2)
    _report_skipped(str(items), skipped)
    _create(db, name, found, k, attention, seed)


@project_app.command("generate")
def project_generate(db: Path = DB_ARG, name: str = typer.Argument(..., help="The new project's name."),
                     prompts: Path = typer.Option(..., "--prompts", help="Prompts: messages, prompt, MBPP or GSM8K "
                                                  "records (lmforge.align.prompts)."),
                     checkpoint: List[str] = typer.Option(..., "--checkpoint", help="NAME=DIR, twice or more."),
                     candidates_out: Optional[Path] = typer.Option(None, "--candidates-out", "-o",
                                                                   help="Also keep the replies as a candidates file."),
                     max_new_tokens: int = typer.Option(128, min=1, help="At most this many tokens per reply."),
                     temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (0 = greedy)."),
                     limit: Optional[int] = typer.Option(None, min=1, help="At most this many prompts."),
                     k: int = K_OPTION, attention: Optional[Path] = ATTENTION_OPTION, seed: int = SEED_OPTION,
                     device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N.")) -> None:
    """A project of comparisons between checkpoints' replies, generated now with each one's chat template."""
    from lmforge.align.prompts import read_prompts
    from lmforge.label.candidates import write_candidates
    from lmforge.label.generate import generate_candidates

    named = dict(c.split("=", 1) for c in checkpoint if "=" in c)
    if len(named) != len(checkpoint) or len(named) < 2:
        verbs.fail(f"--checkpoint takes NAME=DIR, at least two distinct names; got {checkpoint}", 2)
    try:
        found, skipped = read_prompts(prompts, limit=limit)
        _report_skipped(str(prompts), skipped)
        items, skipped = generate_candidates(found, {n: Path(d) for n, d in named.items()},
                                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                             device=device)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        verbs.fail(str(e), 2)
    _report_skipped("generation", skipped)
    if candidates_out is not None:
        write_candidates(candidates_out, items)
    _create(db, name, items, k, attention, seed)


@label_app.command()
def serve(db: Path = DB_ARG, host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback "
                                                      "lets other machines reach the app."),
          port: int = typer.Option(8765, min=0, max=65535, help="TCP port (0: any free one)."),
          secure_cookie: bool = typer.Option(False, "--secure-cookie", help="Send the session cookie over HTTPS "
                                             "only (behind a TLS proxy).")) -> None:
    """Serve the labelling app until Ctrl-C or SIGTERM (both finish the requests in flight, then exit 0)."""
    import uvicorn

    from lmforge.label.app import create_app

    if not is_loopback(host):
        log.warning("binding to %s: the app is reachable from other machines over plain HTTP; put a TLS proxy in "
                    "front and use --secure-cookie", host)
    _store(db)  # a missing or newer database is a usage error before the server starts
    # uvicorn catches SIGINT and SIGTERM itself (stops accepting, lets requests in flight finish), then raises the
    # signal again against the handler it found: this one, so a requested stop ends with status 0, not a kill.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    uvicorn.run(create_app(db, secure_cookie=secure_cookie), host=host, port=port, log_level="info")


def _stopped(signum: int, frame: object) -> None:
    log.info("stopped by %s", signal.Signals(signum).name)


@label_app.command()
def export(db: Path = DB_ARG, project: str = typer.Argument(..., help="The project's name."),
           out: Path = typer.Option(..., "--out", "-o", help="Preferences JSONL (the `lmforge` format)."),
           csv: Optional[Path] = typer.Option(None, "--csv", help="Also the same rows as CSV.")) -> None:
    """Write a project's majority preferences with provenance, ready for the reward-model and DPO stages."""
    from lmforge.label.export import export_csv, export_jsonl

    store = _store(db)
    try:
        written = export_jsonl(store, project, out)
        if csv is not None:
            export_csv(store, project, csv)
    except KeyError as e:
        verbs.fail(e.args[0], 2)
    log.info("exported %d preferences of %s -> %s%s", written, project, out, f" and {csv}" if csv else "")


@label_app.command()
def results(db: Path = DB_ARG, project: str = typer.Argument(..., help="The project's name."),
            n_boot: int = typer.Option(1000, min=1, help="Bootstrap resamples of the rating intervals."),
            seed: int = typer.Option(0, help="Seed of the bootstrap resamples.")) -> None:
    """Print a project's agreement, ratings, per-annotator and judge tables."""
    from lmforge.label.pages import results_tables, tables_text
    from lmforge.label.results import project_results

    try:
        found = project_results(_store(db), project, n_boot=n_boot, seed=seed)
    except KeyError as e:
        verbs.fail(e.args[0], 2)
    typer.echo(tables_text(results_tables(found)), nl=False)


@label_app.command("import-judge")
def import_judge(db: Path = DB_ARG, project: str = typer.Argument(..., help="The project's name."),
                 file: Path = typer.Argument(..., help="A judge's preferences (`lmforge judge` output)."),
                 judge: str = typer.Option(..., "--judge", help="The judge's name on the results page.")) -> None:
    """Add an AI judge's verdicts on a project's items, to compare with the people's votes."""
    from lmforge.align.preferences import to_record
    from lmforge.finetune.data import BadRecord, Skipped, iter_records

    skipped, records = Skipped(), []
    try:
        for location, record in iter_records(file, skipped):
            try:
                to_record(record, "lmforge", ties="keep")  # checks the record; the store keeps the raw one
            except BadRecord as e:
                skipped.add(location, str(e))
                continue
            records.append(record)
        added = _store(db).add_judge_votes(project, judge, records, skipped)
    except (FileNotFoundError, ValueError, KeyError) as e:
        verbs.fail(str(e.args[0] if isinstance(e, KeyError) else e), 2)
    _report_skipped(str(file), skipped)
    log.info("judge %s: %d verdicts added to %s", judge, added, project)
