"""Skipped rows of a dataset: counted, logged, and limited (pure Python).

The input pipeline's prepare functions (tf.data threads) record each bad row
here and never raise; past the limit `exceeded` turns True, the pipeline stops
decoding, and the host's iterator calls `check()`, which raises
`TooManyBadRowsError` in the caller's thread.
"""

import collections
import threading

from absl import logging


class TooManyBadRowsError(ValueError):
  """More distinct rows were bad than config.data.max_bad_fraction allows."""


class BadRows:
  """Counts and logs skipped rows; knows when too many distinct rows are bad.

  Shared by the parallel map's threads, which never raise: past the limit
  `exceeded` turns True and `check()` (called by the host's iterator) raises.
  `count` counts every skip (a bad row is skipped again in each epoch); `rows`
  holds the distinct bad rows as (file, row).

  Args:
    num_rows: the rows this host reads; None: set by the pipeline that uses it.
    max_fraction: config.data.max_bad_fraction (at least 10 rows are allowed).
  """

  def __init__(self, num_rows=None, max_fraction=0.01):
    self.max_fraction = max_fraction
    self.limit = None
    if num_rows is not None:
      self.set_num_rows(num_rows)
    self.count = 0
    self.rows = set()
    self.messages = collections.deque(maxlen=20)
    self._lock = threading.Lock()

  def set_num_rows(self, num_rows):
    self.limit = max(10, int(self.max_fraction * num_rows))

  @property
  def exceeded(self):
    return self.limit is not None and len(self.rows) > self.limit

  def record(self, row_id, message):
    with self._lock:
      self.count += 1
      first = row_id not in self.rows
      self.rows.add(row_id)
      self.messages.append(message)
      num_rows = len(self.rows)
    if first:
      logging.warning(
          'input pipeline: skipping bad row (%d distinct so far): ' '%s', num_rows, message
      )

  def check(self):
    """Raises TooManyBadRowsError past the limit."""
    if self.exceeded:
      last = '; '.join(list(self.messages)[-3:])
      raise TooManyBadRowsError(
          f'input pipeline: {len(self.rows)} distinct bad rows exceed the limit of '
          f'{self.limit} (config.data.max_bad_fraction={self.max_fraction}); last: {last}'
      )

  def per_file(self):
    """{file (or TFDS split): distinct bad rows}."""
    return dict(sorted(collections.Counter(f for f, _ in self.rows).items()))
