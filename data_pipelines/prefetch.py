"""Runs an iterator ahead in a background thread (the training loop's batches)."""

import queue
import threading

_END = object()


class BackgroundIterator:
  """Runs `iterator` up to `size` items ahead in a daemon thread.

  The training loop's host work per batch (tf.data hand-off, the transfer to
  the devices) then overlaps the previous step instead of delaying the next
  dispatch. Items come out in order; an exception raised by `iterator` is
  re-raised here with its own message; `close()` (or dropping this object)
  stops the thread.
  """

  def __init__(self, iterator, size):
    items = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item):
      while not stop.is_set():
        try:
          items.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def produce():  # refers to neither self nor the consumer: dropping it stops this
      try:
        for item in iterator:
          if not put((item, None)):
            return
        put((_END, None))
      except BaseException as e:
        put((None, e))

    self._items, self._stop = items, stop
    self._thread = threading.Thread(target=produce, name='batch_prefetch', daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._stop.is_set():
      raise StopIteration
    item, error = self._items.get()
    if error is not None:
      self.close()
      raise error
    if item is _END:
      self.close()
      raise StopIteration
    return item

  def close(self):
    """Stops the thread (after the item it is producing, if any)."""
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=60)

  def __del__(self):
    self._stop.set()
