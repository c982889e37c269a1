"""What a sweep found: the leaderboard, parameter importances, the optimisation history, the best trial's generator.

    mednist-gan sweep-report configs/sweeps/quality.yaml       # or the sweep's folder: sweeps/quality

Writes ``<sweep_dir>/report/``: ``leaderboard.csv`` and ``leaderboard.json`` (every trial: parameters, scores,
state, run directory), ``history.png`` (the objective by trial with the best so far, and each trial's
in-training evaluations, pruned ones dashed) and ``best_trial/`` (the best complete trial's generator,
exported as ``mednist-gan export`` does, with the sweep in its ``export.json``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError, first_line
from ..files import ensure_writable_folder, write_atomic
from .spec import JOURNAL_FILE, TRIALS_DIR, load_sweep
from .study import RECORD_ATTR, _optuna, make_storage, summary

LEADERBOARD_CSV, LEADERBOARD_JSON, HISTORY_PNG, BEST_TRIAL_DIR = ("leaderboard.csv", "leaderboard.json", "history.png",
                                                                  "best_trial")
_STATE_ORDER = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "fail": 4}


def load_report_study(source: Path, overrides: Sequence[str] = (), sweep_dir: Optional[Path] = None):
    """The study of a search-space file, or of a sweep folder with a journal; with its record and folder.

    Read-only: a journal is neither created nor changed (a cut last line is left to the next worker).
    """
    optuna = _optuna()
    source = Path(source)
    if source.is_dir():
        journal = source / JOURNAL_FILE
        if not journal.is_file():
            raise ConfigError(f"{source}: no {JOURNAL_FILE} in this folder: give the sweep's file instead "
                              "(a sweep with a database storage has no journal)")
        storage, folder = make_storage(str(journal), writer=False), source
        names = optuna.get_all_study_names(storage)
        if len(names) != 1:
            raise ConfigError(f"{journal}: holds {len(names)} sweeps ({', '.join(names)}): give the sweep's file")
        name = names[0]
    else:
        spec = load_sweep(source, overrides, sweep_dir)
        storage, folder, name = make_storage(spec.storage, writer=False), spec.sweep_dir, spec.name
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ConfigError(f"sweep {name}: not started yet (no study in its storage): "
                          "run mednist-gan sweep first") from None
    record = study.user_attrs.get(RECORD_ATTR)
    if not record:
        raise ConfigError(f"study {name}: not a mednist-gan sweep (no record of its search space)")
    return study, record, Path(folder)


def leaderboard(study, record: dict, sweep_dir: Path) -> list[dict]:
    """One row per trial, best first: complete ones by the objective, then pruned, running, waiting, failed."""
    metric = record["objective"]["metric"]
    params = list(record["params"])
    trials = study.get_trials(deepcopy=False)
    score_keys: list[str] = []
    for t in trials:
        score_keys += [k for k in t.user_attrs.get("scores", {}) if k != metric and k not in score_keys]
    rows = []
    for t in trials:
        state = t.state.name.lower()
        if state == "complete":
            value = t.value
        else:  # a pruned, running or failed trial: its last evaluation, if any
            value = t.intermediate_values[t.last_step] if t.last_step is not None else None
        scores = t.user_attrs.get("scores", {})
        row = {"trial": t.number, "state": state, metric: value, "step": t.user_attrs.get("step", t.last_step)}
        row.update({p: t.params.get(p) for p in params})
        row.update({k: scores.get(k) for k in score_keys})
        row["run_dir"] = _shown(sweep_dir / TRIALS_DIR / f"trial_{t.number:04d}")
        if "error" in t.user_attrs:
            row["error"] = t.user_attrs["error"]
        rows.append(row)
    sign = 1 if record["objective"]["direction"] == "minimize" else -1

    def order(row: dict) -> tuple:
        v = row[metric]
        known = v is not None and not math.isnan(v)
        return _STATE_ORDER[row["state"]], not known, sign * v if known else 0, row["trial"]

    return sorted(rows, key=order)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials yet)"
    columns = list(dict.fromkeys(k for row in rows for k in row if k != "error"))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) if i < len(columns) - 1 else v for i, (v, w) in enumerate(zip(r, widths)))
             for r in table]
    failed = [f"trial {row['trial']} failed: {row['error']}" for row in rows if row.get("error")]
    return "\n".join(lines + failed)


def importances(study) -> tuple[Optional[dict], str]:
    """PED-ANOVA parameter importances (Optuna's evaluator that needs no scikit-learn), or why there are none."""
    optuna = _optuna()
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"parameter importances need 2 complete trials or more ({len(complete)} so far)"
    try:
        return optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator()), "PED-ANOVA"
    except Exception as exc:  # noqa: BLE001 - e.g. no parameter varies among complete trials
        return None, f"parameter importances not computed ({type(exc).__name__}: {first_line(exc, 120)})"


def plot_history(study, record: dict, out: Path) -> Path:
    """The objective of each trial and the best so far (left); each trial's in-training evaluations (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    metric, minimize = record["objective"]["metric"], record["objective"]["direction"] == "minimize"
    trials = study.get_trials(deepcopy=False)
    fig, (hist, curves) = plt.subplots(1, 2, figsize=(11, 4))
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.last_step is not None]
    hist.scatter([t.number for t in done], [t.value for t in done], label="complete", color="C0", zorder=3)
    hist.scatter([t.number for t in pruned], [t.intermediate_values[t.last_step] for t in pruned], marker="x",
                 label="pruned (last evaluation)", color="C3", zorder=3)
    best, xs, ys = None, [], []
    for t in sorted(done, key=lambda t: t.number):
        if best is None or (t.value < best if minimize else t.value > best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    if xs:
        hist.step(xs, ys, where="post", color="C1", label="best so far")
    hist.set(xlabel="trial", ylabel=metric, title=f"{study.study_name}: optimisation history")
    hist.xaxis.get_major_locator().set_params(integer=True)
    hist.legend(fontsize=8)
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            curves.plot(steps, [t.intermediate_values[s] for s in steps], marker=".",
                        linestyle="--" if t.state == TrialState.PRUNED else "-", alpha=0.8, label=f"trial {t.number}")
    curves.set(xlabel="training step", ylabel=metric, title="in-training evaluations (pruned: dashed)")
    values = [v for t in trials for v in t.intermediate_values.values() if math.isfinite(v)]
    if values and min(values) > 0 and max(values) > 20 * min(values):  # diverged trials would flatten the rest
        hist.set_yscale("log")
        curves.set_yscale("log")
    if len(trials) <= 12 and curves.lines:
        curves.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out, buffer.getvalue())
    return out


def export_best(study, record: dict, sweep_dir: Path, out_dir: Path) -> Optional[Path]:
    """The best complete trial's generator (its newest intact checkpoint), with the sweep in its provenance."""
    from optuna.trial import TrialState

    from ..generator.export import checkpoint_provenance, export_generator
    from ..generator.loader import open_generator

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    trial_dir = sweep_dir / TRIALS_DIR / f"trial_{best.number:04d}"
    opened = open_generator(trial_dir, checkpoint_only=True)  # its newest intact checkpoint, verified once
    provenance = checkpoint_provenance(opened.source, opened.record)
    provenance["sweep"] = {"name": study.study_name, "trial": best.number, "params": best.params,
                           "objective": {**record["objective"], "value": best.value},
                           "scores": best.user_attrs.get("scores", {})}
    return export_generator(opened.network, opened.model_config, out_dir, provenance)


def sweep_report(source: Path, overrides: Sequence[str] = (), sweep_dir: Optional[Path] = None,
                 out: Optional[Path] = None, export: bool = True) -> dict:
    """Print the leaderboard and write the report files; returns what leaderboard.json holds."""
    study, record, folder = load_report_study(source, overrides, sweep_dir)
    out = ensure_writable_folder(out or folder / "report", "--out")
    rows = leaderboard(study, record, folder)
    metric = record["objective"]["metric"]
    scores, how = importances(study)
    complete = [r for r in rows if r["state"] == "complete"]
    print(f"sweep {study.study_name}: {summary(study) or 'no trials'}; objective {metric} "
          f"({record['objective']['direction']})")
    print(format_table(rows))
    if scores is not None:
        print(f"parameter importances ({how}): " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    else:
        print(how)
    report = {"sweep": study.study_name, "objective": record["objective"], "trials": rows,
              "importances": scores, "importance_method": how if scores is not None else None,
              "best_trial": complete[0]["trial"] if complete else None}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / LEADERBOARD_CSV, buffer.getvalue())
    write_atomic(out / LEADERBOARD_JSON, json.dumps(report, indent=2, default=str) + "\n")
    plot_history(study, record, out / HISTORY_PNG)
    written = [LEADERBOARD_CSV, LEADERBOARD_JSON, HISTORY_PNG]
    if export:
        exported = export_best(study, record, folder, out / BEST_TRIAL_DIR)
        if exported is not None:
            written.append(f"{BEST_TRIAL_DIR}/ (trial {report['best_trial']}'s generator)")
        else:
            print("no complete trial yet: nothing to export")
    print(f"wrote {', '.join(written)} in {_shown(out)}")
    return report
