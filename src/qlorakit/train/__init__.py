"""The training loop, checkpoints and the run folder."""

from .checkpoint import CheckpointError, latest_checkpoint
from .loop import TrainError, TrainState, heldout_loss, train
from .loss import chunked_loss, plain_loss
from .run import RunError, load_run

__all__ = [
    "CheckpointError",
    "RunError",
    "TrainError",
    "TrainState",
    "chunked_loss",
    "heldout_loss",
    "latest_checkpoint",
    "load_run",
    "plain_loss",
    "train",
]
