"""Scalars to TensorBoard event files and the log, and training progress; no TensorFlow needed.

`MetricWriter` writes what ``tf.summary.scalar`` writes (an ``Event`` per step with a float32
scalar tensor under the 'scalars' plugin, so TensorBoard and ``EventAccumulator.Tensors`` read it
as before) through the `tensorboard` package's protos and record format alone, and logs each
step's scalars as ``[step] name=value, ...``. `ProgressReporter` logs steps/s and the ETA every
``every_steps`` steps (and at least every minute) and writes ``steps_per_sec`` and ``uptime``.
Together they replace ``clu.metric_writers`` / ``clu.periodic_actions``, whose writer imports
TensorFlow (a stock JAX GPU / TPU image has none).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from absl import logging


class MetricWriter:
  """Scalars per step to ``logdir`` (TensorBoard event file; None = log only) and the log.

  Args:
    logdir: folder of the event file (created); None on processes that should only log.
    collection: a label in the log lines (e.g. 'eval'); the tags themselves are unchanged.
  """

  def __init__(self, logdir: str | None, collection: str | None = None):
    self._label = f' {collection}' if collection else ''
    self._file = None
    if logdir is not None:
      from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
      from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
      os.makedirs(logdir, exist_ok=True)
      name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
              f'{time.monotonic_ns() % 1_000_000}.v2')
      self.path = os.path.join(logdir, name)
      self._file = open(self.path, 'wb')
      self._records = record_writer.RecordWriter(self._file)
      self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs ``scalars`` and appends them as one event at ``step`` (float32 values)."""
    logging.info('[%d]%s %s', step, self._label, ', '.join(
        f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in sorted(scalars.items())))
    if self._file is None:
      return
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import tensor_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import types_pb2  # pylint: disable=g-import-not-at-top
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'),
        data_class=summary_pb2.DATA_CLASS_SCALAR)
    values = [summary_pb2.Summary.Value(
        tag=k, metadata=meta,
        tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(v)]))
              for k, v in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class ProgressReporter:
  """Called after every step: every ``every_steps`` steps (or ``every_secs``) and at
  ``num_steps`` it logs steps/s, percent and ETA and writes ``steps_per_sec`` and ``uptime``.

  The first call only starts the clock (so compilation is not in the rate).
  """

  def __init__(self, num_steps: int, writer: MetricWriter, every_steps: int,
               every_secs: float = 60.0):
    self._num_steps, self._writer = int(num_steps), writer
    self._every_steps, self._every_secs = int(every_steps), float(every_secs)
    self._t0 = time.monotonic()
    self._last: tuple[int, float] | None = None

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._last is None:
      self._last = (step, now)
      return
    last_step, last_time = self._last
    if step == last_step or not (step % self._every_steps == 0 or step == self._num_steps
                                 or now - last_time >= self._every_secs):
      return
    rate = (step - last_step) / max(now - last_time, 1e-9)
    eta = (self._num_steps - step) / rate
    logging.info('%.1f steps/s, %.1f%% (%d/%d), ETA: %dm%02ds', rate,
                 100 * step / self._num_steps, step, self._num_steps, eta // 60, eta % 60)
    self._writer.write_scalars(step, {'steps_per_sec': rate})
    self._writer.write_scalars(step, {'uptime': now - self._t0})
    self._last = (step, now)


__all__ = ['MetricWriter', 'ProgressReporter']
