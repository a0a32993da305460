"""Terminal output of the command line: rich tables on stdout, rich progress bars on stderr.

Results go to stdout and progress to stderr, so `jfused bench all | tee bench.log` keeps a
clean table while `2>progress.log` keeps the progress apart. Both adapt to where they land:
on a terminal, tables fit its width and bars redraw in place; in a file or pipe, tables take
their natural width (rich would otherwise wrap them at 80 columns) and each progress update
worth keeping is one plain line, with no colours and no cursor control codes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import io
import sys

from rich import box
from rich import console as rich_console
from rich import progress as rich_progress
from rich import table as rich_table
from rich import text as rich_text


def console(*, stderr: bool = False) -> rich_console.Console:
  """A console on stdout (or stderr), of unbounded width off a terminal."""
  result = rich_console.Console(stderr=stderr)
  if not result.is_terminal:
    # A file has no width: wrapping a wide table at rich's 80 columns (or at a $COLUMNS that
    # pytest-xdist, for one, exports to its workers) only garbles it. A table that does not
    # expand still takes no more than its natural width.
    result.width = 1_000
  return result


def table(title: str, *, compact: bool = False, caption: str | None = None) -> rich_table.Table:
  """An empty table in the command line's style: borderless, like a plain-text report, with a
  rule under the header and two spaces between columns (one when `compact`)."""
  return rich_table.Table(
    title=title,
    caption=caption,
    title_justify="left",
    caption_justify="left",
    box=box.SIMPLE_HEAD,
    show_edge=False,
    pad_edge=False,
    collapse_padding=True,
    padding=(0, 0 if compact else 1),
  )


def header(text: str, compact: bool) -> str:
  """A column header, a word per line when `compact`."""
  return text.replace(" ", "\n") if compact else text


def fitted(
  build: Callable[[bool, Sequence[str]], rich_table.Table],
  width: int | None,
  optional: Sequence[str] = (),
) -> rich_table.Table:
  """The first of `build(compact, hidden)`'s tables that is at most `width` columns wide.

  Tried in order: the table as it is; compact (`table` and `header` say how); then compact
  and leaving out the `optional` columns, one more each time, in order. If none fits, the
  last is returned and rich folds its cells. Rich alone would only shrink the widest columns,
  folding names where a header such as "compile s" could have taken two lines instead.

  Args:
    build: makes the table; `hidden` names the columns to leave out.
    width: the terminal's width; None takes the first table as it is.
    optional: headers of columns that may be left out, least needed first.
  """
  result = build(False, ())
  if width is None:
    return result
  # Measured unconstrained: rich clamps a measurement to the console's width.
  measuring = rich_console.Console(width=10_000, file=io.StringIO())
  for hidden in range(len(optional) + 1):
    if measuring.measure(result).maximum <= width:
      break
    result = build(True, optional[:hidden])
  return result


class _RateColumn(rich_progress.ProgressColumn):
  """Units per second, or seconds per unit when a unit takes longer than a second."""

  def __init__(self, unit: str):
    super().__init__()
    self.unit = unit

  def render(self, task: rich_progress.Task) -> rich_text.Text:
    speed = task.finished_speed or task.speed
    if not speed:
      text = f"? {self.unit}/s"
    elif speed >= 1:
      text = f"{speed:.1f} {self.unit}/s"
    else:
      text = f"{1 / speed:.1f} s/{self.unit}"
    return rich_text.Text(text, style="progress.data.speed")


class ProgressBars(rich_progress.Progress):
  """Rich progress bars on stderr: description, bar, done/total, rate, elapsed, time left and
  a free-text `note` field.

  On a terminal rich redraws the bars in place. Anywhere else (`2>file`, a pipe, pytest's
  capture) rich draws nothing until the end, so `show` prints the task's line there instead,
  once per call: a log file gets a readable history of plain lines.

  Usage:
    with ProgressBars("step") as bars:
      task = bars.add_task("fused", total=100)
      for step in range(1, 101):
        bars.show(task, completed=step, note=f"loss {loss:.3f}")
  """

  def __init__(self, unit: str, *, speed_estimate_period: float = 30.0):
    stderr = console(stderr=True)
    # The condition under which rich.live redraws in place (`self.live` is rich's Live).
    self.in_place = stderr.is_jupyter or (stderr.is_terminal and not stderr.is_dumb_terminal)
    super().__init__(
      rich_progress.TextColumn("{task.description}"),
      # In a log the bar has no colours to tell done from to-do, so rich draws only the done
      # part: keep it short there.
      rich_progress.BarColumn(bar_width=40 if self.in_place else 20),
      rich_progress.MofNCompleteColumn(),
      _RateColumn(unit),
      rich_progress.TimeElapsedColumn(),
      rich_progress.TextColumn("eta"),
      rich_progress.TimeRemainingColumn(),
      rich_progress.TextColumn("{task.fields[note]}", markup=False),
      console=stderr,
      # Off a terminal the lines `show` printed are the record; a final redraw of every bar
      # would only repeat them.
      transient=not self.in_place,
      # stdout carries the results: print them above the bars only when they share the
      # screen; diverted to stderr they would be lost from `jfused ... > results.txt`.
      redirect_stdout=sys.stdout.isatty(),
      speed_estimate_period=speed_estimate_period,
    )

  def add_task(
    self,
    description: str,
    start: bool = True,
    total: float | None = 100.0,
    completed: int = 0,
    visible: bool = True,
    **fields,
  ) -> rich_progress.TaskID:
    """`rich.progress.Progress.add_task`, with an empty `note` unless one is given."""
    return super().add_task(
      description,
      start=start,
      total=total,
      completed=completed,
      visible=visible,
      **{"note": "", **fields},
    )

  def show(self, task_id: rich_progress.TaskID, *, log: bool = True, **changes) -> None:
    """`update(task_id, **changes)`; off a terminal also prints the task's line if `log`."""
    self.update(task_id, **changes)
    if log and not self.in_place:
      task = next(task for task in self.tasks if task.id == task_id)
      self.console.print(self.make_tasks_table([task]))
