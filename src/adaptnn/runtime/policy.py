"""The decision-point contract between the runtime and exit rules.

The runtime (:func:`~adaptnn.runtime.execution.dynamic_loop`) asks an :class:`ExitPolicy` after every exit
head which samples stop there; the rules themselves live in :mod:`adaptnn.policies`, a layer above. Keeping
the protocol here lets the runtime depend on the contract only, never on a concrete rule.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .state import State

__all__ = ["ExitPolicy"]


@runtime_checkable
class ExitPolicy(Protocol):
    """Decides after each exit head which samples stop there.

    * ``check_num_exits(num_exits)`` raises :class:`~adaptnn.errors.ConfigError` when the policy was built
      for another number of exits; it never changes the policy.
    * ``init_state(batch_size, device)`` returns the per-sample state carried from exit to exit (``None`` for
      stateless rules); the runtime compacts it together with the model's state.
    * ``decide(exit_index, logits, state) -> (done [b] bool, prediction [b, C], new_state)``; at the last exit
      every sample stops whatever ``done`` says.
    """

    def check_num_exits(self, num_exits: int) -> None: ...

    def init_state(self, batch_size: int, device: torch.device) -> State: ...

    def decide(self, exit_index: int, logits: Tensor, state: State) -> tuple[Tensor, Tensor, State]: ...
