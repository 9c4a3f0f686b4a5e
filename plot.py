"""Compare training runs: a summary table, and loss curves against tokens and against wall-clock time.

    python plot.py out/lr_1e-3 out/lr_3e-3               # run directories written by train.py
    python plot.py 'out/lr_*' --out=assets/lr_sweep.png  # glob patterns are expanded here, quoted or not
    python plot.py 'out/lr_*' --table=md                 # the table as Markdown, for the README
    python plot.py 'out/lr_*' --ylim 1.4 3.0             # fix the loss axis (default: auto, see auto_ylim)
    python plot.py 'out/bs_*' --label=batch_size,lr       # label by these keys only (default: every key that differs)
    python plot.py 'out/*' --metric=bpb                  # validation bits per byte: compares across tokenizers

Each run directory holds train.py's log.csv and config.json. A run is labelled by the config values that
differ between the runs (e.g. `lr=0.003 norm=none`), or by its directory name. The table goes to stdout,
notes to stderr. With matplotlib installed (optional: `pip install matplotlib`) the figure is written to
--out, by default plot.png in the directory holding the first run (out/lr_* -> out/plot.png).
Unreadable runs are skipped with a one-line note; the exit code is 2 only if no run could be read.
"""
import argparse
import csv
import glob
import io
import json
import math
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass

NUMBERS = ("tokens", "elapsed_s", "train_loss", "val_loss", "tokens_per_s")  # log.csv columns we plot or tabulate
OPTIONAL = ("val_bpb",)  # columns of newer logs; None in a log written before them
METRICS = {"loss": "val_loss", "bpb": "val_bpb"}  # --metric: the validation column compared
UNLABELLED = {"out_dir", "resume"}  # config keys that differ between runs without describing them
FORMATS = ("png", "svg", "svgz", "pdf", "eps", "ps", "pgf")  # what matplotlib writes without extra packages
HEADER = ("run", "best val", "final val", "tokens", "wall time", "tokens/s", "diverged")  # "val": loss or bpb


@dataclass
class Run:
    """One training run: its directory, resolved config and log rows (floats, None where empty, plus status)."""
    path: str
    config: dict
    rows: list[dict]
    label: str = ""


def note(message: str) -> None:
    print(f"plot.py: {message}", file=sys.stderr)


def expand(patterns: list[str]) -> list[str]:
    """Run directories matched by each argument (a directory, its log.csv, or a glob pattern of either), in
    order, without duplicates."""
    paths = []
    for pattern in patterns:
        matches = [os.path.dirname(m) or "." if os.path.basename(m) == "log.csv" else m
                   for m in sorted(glob.glob(pattern))]
        if not matches:
            note(f"skipping {pattern}: no such directory")
        paths += [m for m in matches if m not in paths]
    return paths


def parse_row(row: dict, line: int) -> dict:
    """One CSV row -> {column: float or None, 'status': str}; raises ValueError naming the line."""
    if None in row or None in row.values():  # DictReader's marks for too many / too few fields
        raise ValueError(f"log.csv line {line}: wrong number of fields")
    try:  # tokens and elapsed_s are always logged; the others may be empty (e.g. val_loss between evals)
        parsed = {k: float(row[k]) if row[k].strip() or k in ("tokens", "elapsed_s") else None for k in NUMBERS}
        parsed |= {k: float(row[k]) if row.get(k, "").strip() else None for k in OPTIONAL}
    except ValueError as e:
        raise ValueError(f"log.csv line {line}: {e}") from None
    return parsed | {"status": row["status"].strip()}


def read_log(csv_path: str) -> list[dict]:
    """Parse a log.csv; a last line cut off mid-write (no newline yet) is skipped with a note."""
    try:
        with open(csv_path, newline="") as f:
            head, newline, cut = f.read().rpartition("\n")  # train.py writes whole lines, each ending in "\n"
    except UnicodeDecodeError:
        raise ValueError("log.csv is not text (corrupt file?)") from None
    reader = csv.DictReader(io.StringIO(head + newline))
    try:
        if not reader.fieldnames:
            raise ValueError("log.csv is empty")
        missing = [c for c in NUMBERS + ("status",) if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"log.csv lacks column(s) {', '.join(missing)}; is it a train.py log?")
        rows = [parse_row(row, reader.line_num) for row in reader]
    except csv.Error as e:
        raise ValueError(f"log.csv line {reader.line_num}: {e}") from None
    if not rows:
        raise ValueError("log.csv has a header but no rows yet")
    if cut:
        note(f"{csv_path}: last line incomplete (run interrupted mid-write?), skipped")
    return rows


def read_config(run_dir: str) -> dict:
    """The run's config.json, or {} with a note (the run is then labelled by its directory name)."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        problem = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e})"
        note(f"{run_dir}: config.json {problem}; labelled by directory name")
        return {}
    return config if isinstance(config, dict) else {}


def read_run(path: str) -> Run:
    """Load one run directory; raises ValueError with a one-line reason if its log is unusable."""
    csv_path = os.path.join(path, "log.csv")
    if not os.path.isfile(csv_path):
        raise ValueError("no log.csv in it (run not started yet, or not a run directory?)")
    rows = read_log(csv_path)
    return Run(path, read_config(path), rows)


def _value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"  # a derived min_lr: 0.00030000000000000003 -> '0.0003'
    return v if isinstance(v, str) else str(v).replace(" ", "")  # (0.9, 0.95) -> '(0.9,0.95)'


def label_runs(runs: list[Run], only: list[str] | None = None) -> None:
    """Label runs by the config values that differ between them, e.g. 'lr=0.003 norm=none' (or by the keys in
    `only`, when a sweep changes several keys together and one or two of them tell the story)."""
    configured = [r.config for r in runs if r.config]
    keys = only or [k for k in dict.fromkeys(k for c in configured for k in c) if k not in UNLABELLED]
    differing = [k for k in keys if len({_value(c.get(k)) for c in configured}) > 1]
    for run in runs:
        name = os.path.basename(os.path.normpath(run.path))
        run.label = " ".join(f"{k}={_value(run.config[k])}" for k in differing if k in run.config) or name
    repeated = Counter(r.label for r in runs)
    for run in runs:  # identical settings (e.g. a rerun): tell them apart by directory
        if repeated[run.label] > 1:
            run.label += f" ({os.path.basename(os.path.normpath(run.path))})"


def _losses(rows: list[dict], column: str = "val_loss") -> list[float]:
    """Train and val losses (column='val_loss') or val_bpb alone, in logged order, skipping the empty cells."""
    columns = ("train_loss", "val_loss") if column == "val_loss" else (column,)
    return [row[k] for row in rows for k in columns if row[k] is not None]


def diverged(run: Run) -> bool:
    """True if train.py stopped the run for divergence or any logged loss is non-finite."""
    return any(row["status"] == "diverged" for row in run.rows) or not all(map(math.isfinite, _losses(run.rows)))


def _count(n: float) -> str:
    """Compact count: 1228800 -> '1.23M'."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"


def table_row(run: Run, column: str = "val_loss") -> list[str]:
    """The run's table cells, best and final of `column`; tokens/s is the median logged rate (robust to slow
    warm-up and compile steps)."""
    vals = [row[column] for row in run.rows if row[column] is not None]
    best = min((v for v in vals if math.isfinite(v)), default=None)
    rates = [row["tokens_per_s"] for row in run.rows if row["tokens_per_s"]]
    last = run.rows[-1]
    return [run.label, f"{best:.4f}" if best is not None else "-", f"{vals[-1]:.4f}" if vals else "-",
            _count(last["tokens"]), _duration(last["elapsed_s"]),
            _count(statistics.median(rates)) if rates else "-", "yes" if diverged(run) else "no"]


def format_table(rows: list[list[str]], markdown: bool = False, column: str = "val_loss") -> str:
    """Aligned plain-text table, or a Markdown table (numbers right-aligned in both)."""
    header = [h + " bpb" if "val" in h and column == "val_bpb" else h for h in HEADER]
    if markdown:
        lines = [header, ["---"] + ["--:"] * (len(header) - 1), *rows]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    table = [header, *rows]
    widths = [max(map(len, column)) for column in zip(*table)]
    return "\n".join(cells[0].ljust(widths[0]) + "".join(c.rjust(w + 2) for c, w in zip(cells[1:], widths[1:]))
                     for cells in table)


def auto_ylim(runs: list[Run], column: str = "val_loss") -> tuple[float, float] | None:
    """A y-range for comparing runs: skip each run's first 10% of tokens (the steep initial drop)
    and, for the top, diverged runs (their blow-ups would flatten every other curve)."""
    def losses(rs: list[Run]) -> list[float]:
        late = [row for r in rs for row in r.rows if row["tokens"] >= 0.1 * r.rows[-1]["tokens"]]
        return [v for v in _losses(late, column) if math.isfinite(v)]
    low, high = losses(runs), losses([r for r in runs if not diverged(r)]) or losses(runs)
    if not low:
        return None
    lo, hi = min(low), max(high)
    pad = 0.05 * (hi - lo) or 0.1
    return lo - pad, hi + pad


def _curve(run: Run, x: str, y: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    points = [(row[x] / scale, row[y]) for row in run.rows if row[y] is not None and math.isfinite(row[y])]
    return [p[0] for p in points], [p[1] for p in points]


def write_plot(runs: list[Run], out: str, ylim: tuple[float, float] | None, column: str = "val_loss") -> bool:
    """Draw val (solid) and train (light) loss vs tokens, and val loss vs time, into `out` (column='val_bpb': val bits
    per byte alone); diverged runs end in an x (drawn at the top edge if off-range). Returns False when matplotlib
    is not installed."""
    try:  # optional dependency, imported only here; Figure without pyplot renders with Agg, no display needed
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        return False
    fig = Figure(figsize=(13, 4.8))
    by_tokens, by_time = fig.subplots(1, 2)
    scale, unit = (60.0, "min") if max(r.rows[-1]["elapsed_s"] for r in runs) > 600 else (1.0, "s")
    top = ylim[1] if ylim else math.inf
    for i, run in enumerate(runs):
        color, bad = f"C{i % 10}", diverged(run)
        if column == "val_loss":
            by_tokens.plot(*_curve(run, "tokens", "train_loss"), color=color, alpha=0.3, lw=1)
        by_tokens.plot(*_curve(run, "tokens", column), color=color, lw=2,
                       label=run.label + (" (diverged)" if bad else ""))
        by_time.plot(*_curve(run, "elapsed_s", column, scale), color=color, lw=2)
        if bad:
            finite = [v for v in _losses(run.rows, column) if math.isfinite(v)]
            y = min(finite[-1] if finite else top, top)  # the last finite loss, kept inside the y-range
            last = run.rows[-1]
            by_tokens.plot(last["tokens"], y, "x", color=color, ms=10, mew=2, clip_on=False)
            by_time.plot(last["elapsed_s"] / scale, y, "x", color=color, ms=10, mew=2, clip_on=False)
    if column == "val_loss":
        by_tokens.set(xlabel="tokens", ylabel="loss", title="loss vs tokens: validation (solid), training (light)")
        by_time.set(xlabel=f"wall-clock time ({unit})", ylabel="validation loss", title="validation loss vs time")
    else:
        by_tokens.set(xlabel="tokens", ylabel="validation bits per byte", title="validation bits per byte vs tokens")
        by_time.set(xlabel=f"wall-clock time ({unit})", ylabel="validation bits per byte",
                    title="validation bits per byte vs time")
    by_tokens.xaxis.set_major_formatter(EngFormatter())
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
        if ylim:
            ax.set_ylim(*ylim)
    by_tokens.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out + ".tmp", format=os.path.splitext(out)[1][1:].lower() or "png", dpi=110)
    os.replace(out + ".tmp", out)  # atomic: never a half-written picture under the final name
    return True


def check_args(args: argparse.Namespace) -> None:
    """Refuse a meaningless --ylim or --out before reading any run, in one line naming the option."""
    if args.ylim and not (all(map(math.isfinite, args.ylim)) and args.ylim[0] < args.ylim[1]):
        raise ValueError(f"--ylim {args.ylim[0]:g} {args.ylim[1]:g}: give two finite numbers, the lower first")
    if args.out and os.path.isdir(args.out):
        raise ValueError(f"--out={args.out} is a directory; name an image file, e.g. {args.out}/plot.png")
    ext = os.path.splitext(args.out or "")[1][1:].lower()
    if ext and ext not in FORMATS:
        raise ValueError(f"--out={args.out}: matplotlib cannot write .{ext} files here; use .png, .svg or .pdf")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Tabulate and plot train.py runs (log.csv + config.json).")
    parser.add_argument("runs", nargs="+", help="run directories or their log.csv files, or glob patterns "
                                                "such as 'out/lr_*'")
    parser.add_argument("--out", help="image file (default: plot.png in the directory holding the first run)")
    parser.add_argument("--ylim", type=float, nargs=2, metavar=("LO", "HI"), help="loss axis range (default: auto)")
    parser.add_argument("--table", choices=("text", "md"), default="text", help="table format (md: Markdown)")
    parser.add_argument("--label", help="comma-separated config keys to label runs by (default: all that differ)")
    parser.add_argument("--metric", choices=tuple(METRICS), default="loss",
                        help="what to compare: validation loss (nats/token, with the training loss) or bpb (bits "
                             "per UTF-8 byte, comparable across tokenizers)")
    args = parser.parse_args(argv)
    check_args(args)
    runs = []
    for path in expand(args.runs):
        try:
            runs.append(read_run(path))
        except (ValueError, OSError) as e:
            note(f"skipping {path}: {e}")
    if not runs:
        note("no run could be read")
        return 2
    only = args.label.split(",") if args.label else None
    for key in only or ():
        if not any(key in r.config for r in runs):
            note(f"--label: no run's config has the key '{key}'")
    label_runs(runs, only)
    column = METRICS[args.metric]
    if column == "val_bpb":
        for run in runs:
            if all(row[column] is None for row in run.rows):
                note(f"{run.path}: no val_bpb in its log.csv (written before train.py logged it)")
    print(format_table([table_row(r, column) for r in runs], markdown=args.table == "md", column=column))
    out = args.out or os.path.join(os.path.dirname(os.path.normpath(runs[0].path)), "plot.png")
    if write_plot(runs, out, args.ylim or auto_ylim(runs, column), column):
        note(f"wrote {out}")
    else:
        note("no picture: matplotlib is not installed (pip install matplotlib to get the picture)")
    return 0


if __name__ == "__main__":
    from configurator import run_cli

    run_cli(main)
