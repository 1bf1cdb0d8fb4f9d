"""What the fold command prints: short lines for people, colour only on a terminal.

Every function here turns a :class:`bnfold.pipeline.FoldOutcome` (or its parts) into text;
none decides anything. Colour: green for a pass, red for a failure, yellow for what was left
with a reason; plain when the stream is not a terminal or ``NO_COLOR`` is set.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Dict, List, Optional

import click


WIDTH = 99  # default lines stay under 100 columns


def color_enabled() -> Optional[bool]:
    """False under NO_COLOR (https://no-color.org); None lets click decide per stream (tty)."""
    return False if os.environ.get("NO_COLOR") else None


def echo(text: str = "", err: bool = False) -> None:
    click.echo(text, err=err, color=color_enabled())


def green(text: str) -> str:
    return click.style(text, fg="green")


def red(text: str) -> str:
    return click.style(text, fg="red", bold=True)


def yellow(text: str) -> str:
    return click.style(text, fg="yellow")


def _fit(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ------------------------------------------------------------------ one model


def fold_line(outcome, dry_run: bool) -> str:
    """``folded 2 of 3 BatchNorm(s) (9 -> 8 nodes, 1.2 kB -> 994 B); left 1: no-linear-producer``
    (``would fold`` in a dry run)."""
    report = outcome.report
    total = report.n_folded + report.n_skipped
    verb, leave = ("would fold", "would leave") if dry_run else ("folded", "left")
    head = f"{verb} {report.n_folded} of {total} BatchNorm(s)" + _shrink(outcome.before, outcome.after)
    if not report.n_skipped:
        return head
    reasons = ", ".join(f"{n} {code}" if len(report.reason_counts()) > 1 else code
                        for code, n in report.reason_counts().items())  # fmt: skip
    tail = _fit(f"{leave} {report.n_skipped}: {reasons}", WIDTH - len(head) - 2)
    return f"{head}; {yellow(tail)}"


def _shrink(before: Optional[Dict], after: Optional[Dict]) -> str:
    """`` (40 -> 28 nodes, 50.6 kB -> 43.8 kB)``: what is known of the model before and after."""
    before, after = before or {}, after or {}
    parts = []
    if before.get("nodes") is not None and after.get("nodes") is not None:
        parts.append(f"{before['nodes']} -> {after['nodes']} nodes")
    if before.get("bytes") is not None and after.get("bytes") is not None:
        parts.append(f"{human_bytes(before['bytes'])} -> {human_bytes(after['bytes'])}")
    return f" ({', '.join(parts)})" if parts else ""


def check_line(outcome, checked: bool, dry_run: bool) -> str:
    """One line for the equivalence check: its verdict, or why it did not run."""
    v = outcome.verdict
    if v is None:
        if dry_run:
            return "check: not run (dry run: nothing was written to check)"
        if outcome.format == "pt2" and checked:
            return yellow("check: not run (the program carries no example inputs)")
        if not checked:
            return yellow("check: skipped (--no-check)")
        return "check: not run"
    outputs, sites = v.get("outputs") or [], v.get("sites") or []
    worst = _worst_rel(outputs)
    if v.get("passed"):
        where = f"{len(outputs)} output(s)" + (f" and {len(sites)} fold site(s)" if sites else "")
        return f"check: {green('PASS')}, {where} match (max rel error {worst:.2g})"
    details = []  # the sites first: they say where the fold went wrong
    bad_sites = [s for s in sites if not s.get("passed")]
    if bad_sites:
        names = ", ".join(str(s.get("node", "?")) for s in bad_sites[:3]) + (", ..." if len(bad_sites) > 3 else "")
        details.append(f"{len(bad_sites)} of {len(sites)} fold site(s) differ ({names})")
    failed = [o for o in outputs if not o.get("passed")]
    if failed:
        names = ", ".join(o.get("name", "?") for o in failed[:3]) + (", ..." if len(failed) > 3 else "")
        details.append(f"{len(failed)} of {len(outputs)} output(s) differ ({names}; max rel error {worst:.2g})")
    if not details and v.get("problems"):
        details.append(v["problems"][0])
    return _fit(f"check: {red('FAIL')}, {'; '.join(details) or 'see --verbose'}")


def _worst_rel(entries) -> float:
    return max((e.get("max_rel_err") or 0.0 for e in entries if isinstance(e.get("max_rel_err"), float)), default=0.0)


def written_line(outcome, dry_run: bool, wall: Optional[float] = None) -> str:
    """Where the model went, and the command's wall time with its parts."""
    times = times_text(outcome, wall)
    if dry_run or not outcome.written:
        return f"nothing written (dry run) in {times}"
    return f"wrote {outcome.written} in {times}"


def times_text(outcome, wall: Optional[float] = None) -> str:
    """``0.90 s: start 0.35, load 0.00, fold 0.06, write 0.03, check 0.46``; ``start`` is the
    rest of ``wall`` (start-up: imports, options) when the command's wall time is given."""
    parts = dict(outcome.times)
    total = outcome.seconds
    if wall is not None and wall > total:
        parts = {"start": wall - sum(parts.values()), **parts}
        total = wall
    text = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
    return f"{total:.2f} s" + (f": {text}" if text else "")


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def details(outcome, dry_run: bool) -> List[str]:
    """``--verbose``: every BN and its fate, notes, and the before/after table."""
    lines = outcome.report.summary(verbose=True).splitlines()[1:]  # the head is the fold line
    lines.extend(table(outcome.before, outcome.after, dry_run))
    return lines


def table(before: Optional[Dict], after: Optional[Dict], dry_run: bool) -> List[str]:
    """Op counts and file size, before and after (only ops present in either)."""
    if not before:
        return []
    after = after or {}
    rows = []
    ops_b, ops_a = before.get("ops") or {}, after.get("ops") or {}
    for op in sorted(set(ops_b) | set(ops_a)):
        rows.append((op, str(ops_b.get(op, 0)), str(ops_a.get(op, 0))))
    if before.get("nodes") is not None:
        rows.append(("nodes", str(before["nodes"]), str(after.get("nodes", "?"))))
    size_after = "-" if dry_run else human_bytes(after.get("bytes"))
    rows.append(("file size", human_bytes(before.get("bytes")), size_after))
    width = max(len(r[0]) for r in rows + [("op", "", "")])
    out = [f"  {'op':{width}}  {'before':>10}  {'after':>10}"]
    for name, b, a in rows:
        mark = "" if b == a else "  *"
        out.append(f"  {name:{width}}  {b:>10}  {a:>10}{mark}")
    return out


def check_details(verdict: Optional[Dict]) -> List[str]:
    """``--verbose``: every output's statistics and the tolerance rule."""
    if not verdict:
        return []
    lines = [f"  rule: {verdict.get('rule', '')}"]
    for o in verdict.get("outputs") or []:
        if o.get("problem"):
            lines.append(f"  {o.get('name')}: {o['problem']}")
            continue
        mark = "ok  " if o.get("passed") else "FAIL"
        lines.append(
            f"  {mark} {o.get('name')}: max abs {_g(o.get('max_abs_err'))}, max rel {_g(o.get('max_rel_err'))}, "
            f"failing {o.get('failing')}/{o.get('total')}, atol {_g(o.get('atol'))}, rtol {_g(o.get('rtol'))}"
        )
    for site in verdict.get("sites") or []:
        mark = "ok  " if site.get("passed") else "FAIL"
        text = site.get("problem") or (f"max abs {_g(site.get('max_abs_err'))}, max rel {_g(site.get('max_rel_err'))}, "
                                       f"failing {site.get('failing')}/{site.get('total')}")  # fmt: skip
        lines.append(f"  {mark} site {site.get('fold', site.get('node'))}: {text}")
    lines.extend(f"  problem: {p}" for p in verdict.get("problems") or [])
    inputs = (verdict.get("inputs") or {}).get("tensors") or []
    if inputs:
        feed = ", ".join(f"{t['name']} [{'x'.join(map(str, t['shape']))}]" for t in inputs)
        seed = verdict["inputs"].get("seed")
        lines.append(f"  inputs: {feed}" + (f"; seed {seed}" if seed is not None else f" ({inputs[0].get('source')})"))
    lines.extend(f"  note: {n}" for n in verdict.get("notes") or [])
    return lines


def _g(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


# ------------------------------------------------------------------ many models


def batch_line(outcome, dry_run: bool) -> str:
    """One line per model, printed as it finishes."""
    if outcome.ok:
        r = outcome.report
        total = r.n_folded + r.n_skipped
        secs = f"({outcome.seconds:.2f} s)"
        if dry_run:
            left = f", {yellow(f'would leave {r.n_skipped}')}" if r.n_skipped else ""
            return f"{'ok':5} {outcome.source}: would fold {r.n_folded} of {total}{left} {secs}"
        left = f", {yellow(f'left {r.n_skipped}')}" if r.n_skipped else ""
        check = "" if outcome.verdict is None else f", check {green('PASS')}"
        return f"{green('ok   ')} {outcome.source} -> {outcome.written}: folded {r.n_folded} of {total}{left}{check} {secs}"
    error = outcome.error or ""
    if error.startswith(outcome.source + ": "):  # the line already names the model
        error = error[len(outcome.source) + 2:]
    return f"{red('FAIL ')} {outcome.source}: {error} [exit {outcome.exit_code}]"


class Status:
    """A single status line on stderr, redrawn in place, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            columns = _columns()
            sys.stderr.write("\r\033[K" + text[: columns - 1])
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.enabled and self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def _tail(text: str, room: int) -> str:
    """``text``, or its end after an ellipsis when longer than ``room`` (a path's file name)."""
    return text if len(text) <= room else "…" + text[len(text) - max(room - 1, 0):]


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


class BatchProgress(Status):
    """``[####......] 2/5  models/b.onnx``: models done of all, and the next one in order
    still running, from the start; results are printed above it as they come."""

    def __init__(self, jobs) -> None:
        super().__init__()
        self.sources = [src for src, _ in jobs]
        self.done = set()
        self.redraw()

    def finished(self, outcome) -> None:
        for i, src in enumerate(self.sources):
            if src == outcome.source and i not in self.done:
                self.done.add(i)
                break

    def redraw(self) -> None:
        total = len(self.sources)
        n = len(self.done)
        filled = int(20 * n / total) if total else 20
        current = next((s for i, s in enumerate(self.sources) if i not in self.done), "")
        head = f"[{'#' * filled}{'.' * (20 - filled)}] {n}/{total}  "
        self.show(head + _tail(current, _columns() - 1 - len(head)))

    def print_above(self, text: str) -> None:
        self.clear()
        echo(text)
        self.redraw()


class PhaseProgress(Status):
    """``checking model.onnx (3.2 s)`` while one model goes through its phases, the time
    ticking every half second (on a terminal only)."""

    LABELS = {"load": "loading", "fold": "folding", "write": "writing", "check": "checking"}

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source, self.phase = source, None
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.enabled:
            threading.Thread(target=self._tick, daemon=True).start()

    def __call__(self, phase: str) -> None:
        self.phase = phase
        self._draw()

    def _draw(self) -> None:
        with self._lock:
            if self.phase is not None and not self._stop.is_set():
                elapsed = time.perf_counter() - self.start
                label, when = self.LABELS.get(self.phase, self.phase), f" ({elapsed:.1f} s)"
                self.show(f"{label} {_tail(self.source, _columns() - 2 - len(label) - len(when))}{when}")

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def clear(self) -> None:
        self._stop.set()
        with self._lock:
            super().clear()
