"""Training of the base diffusion model: eps-prediction MSE, AdamW, EMA, data parallel.

Modules: ``step`` (the pure, jitted train step and its state), ``stream`` (the deterministic data
order over hosts), ``loop`` (the impure shell: `train`, checkpoints, signals, metrics, samples).
"""

from ddm_ood.train.loop import append_metrics
from ddm_ood.train.loop import train
from ddm_ood.train.loop import TrainingDivergedError
from ddm_ood.train.loop import truncate_metrics
from ddm_ood.train.loop import write_samples
from ddm_ood.train.step import create_train_state
from ddm_ood.train.step import loss_fn
from ddm_ood.train.step import make_lr_schedule
from ddm_ood.train.step import make_optimizer
from ddm_ood.train.step import make_train_step
from ddm_ood.train.step import TrainState
from ddm_ood.train.stream import BatchStream
from ddm_ood.train.stream import check_batch_size
from ddm_ood.train.stream import load_training_images
from ddm_ood.train.stream import make_stream

__all__ = ['TrainState', 'make_lr_schedule', 'make_optimizer', 'create_train_state', 'loss_fn',
           'make_train_step', 'BatchStream', 'check_batch_size', 'load_training_images',
           'make_stream', 'train', 'TrainingDivergedError', 'write_samples', 'append_metrics',
           'truncate_metrics']
