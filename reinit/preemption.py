"""Preemption notices: SIGTERM or SIGUSR1 asks a run to checkpoint its current step and stop.

Schedulers warn before they take a machine away: Slurm sends SIGTERM on `scancel`/`scontrol
requeue` and, with `--signal=B:USR1@SECONDS`, SIGUSR1 before the time limit; Cloud TPU and
Kubernetes send SIGTERM. `Notice` turns those signals into a flag the training loop polls once
per step (a Python bool, no device sync), so the run saves a checkpoint of the step it is at
and exits instead of losing the work since its last checkpoint.

On several processes (after `jax.distributed.initialize()`) the processes must agree on the
step they save, or their checkpoints would not fit together: there JAX's preemption sync
manager owns SIGTERM (its notice reaches every process through the coordination service) and
`reached` asks it, through orbax's `reached_preemption`, whether the agreed step is this one.
SIGUSR1 is then re-sent to the process as SIGTERM, so both signals work on one host and many.
"""

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Notice:
  """Installs the handlers on creation; `restore()` puts the previous ones back.

  Handlers can only be installed from the main thread; elsewhere (a run started from a worker
  thread) the notice stays inert and the signals keep their previous meaning.
  """

  def __init__(self):
    self.signal: int | None = None  # the signal received, if any
    self._previous = {}
    self.multiprocess = _process_count() > 1
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in SIGNALS:
      if self.multiprocess and sig == signal.SIGTERM:
        continue  # JAX's preemption sync manager listens to it
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signum
    if self.multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

  def reached(self, step: int) -> bool:
    """True at the step the run should checkpoint and stop; call it at every step.

    One process: a signal arrived. Several: the processes reached the step they agreed on
    (every process must call this at every step, as JAX's sync protocol requires).
    """
    if self.multiprocess:
      from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
      return multihost.reached_preemption(step)
    return self.signal is not None

  def restore(self) -> None:
    """Puts back the handlers that were installed before this notice."""
    for sig, previous in self._previous.items():
      # None: the previous handler was not installed from Python; the default is what it did.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous = {}


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()
