"""Tests of ddm_ood.memory: the scorer's memory estimate and the batch / chunk rule (pure)."""

import math

import pytest

from ddm_ood import memory

GIB = 2 ** 30
# configs/celeba.py's network (ch 128, ch_mult (1, 2, 2, 2), 3 res blocks, attention at 16 and 8).
CELEBA = dict(image_size=32, channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=3,
              attn_resolutions=(16, 8), num_heads=4)


def test_state_estimate_scales_with_the_network():
  f32 = memory.unet_state_bytes(**CELEBA)
  bf16 = memory.unet_state_bytes(**CELEBA, dtype_bytes=2)
  wider = memory.unet_state_bytes(**{**CELEBA, 'ch': 256})
  assert 10 * 2 ** 20 < f32 < 40 * 2 ** 20     # ~21 MiB; XLA's CPU buffers: see memory_bench
  assert 0.5 * f32 < bf16 < 0.75 * f32         # attention logits stay float32
  assert 1.6 * f32 < wider < 2.0 * f32        # all but the attention logits double


def test_no_budget_keeps_the_config():
  assert memory.plan_scorer_batch(10, 1, 0, math.inf, 10, 128, 0, 1) == (128, 0)
  assert memory.plan_scorer_batch(10, 1, 0, 0, 10, 128, 8, 1) == (128, 8)
  # Batch rounded up to the devices; chunk to a multiple of them that divides the batch.
  assert memory.plan_scorer_batch(10, 1, 0, math.inf, 10, 100, 0, 3) == (102, 0)
  assert memory.plan_scorer_batch(10, 1, 0, math.inf, 10, 128, 3, 2) == (128, 4)
  assert memory.plan_scorer_batch(10, 1, 0, math.inf, 10, 20, 8, 3) == (18, 9)


def test_budget_lowers_the_chunk():
  state, image = 100, 50
  per_image = 10 * state + image                 # 1050 bytes per image with K = 10
  budget = 500 + 40 * per_image + 7              # room for 40 images per device after 500 fixed
  assert memory.plan_scorer_batch(state, image, 500, budget, 10, 128, 0, 1) == (120, 40)
  assert memory.plan_scorer_batch(state, image, 500, budget, 10, 128, 0, 2) == (80, 0)
  assert memory.plan_scorer_batch(state, image, 500, budget, 10, 256, 0, 2) == (240, 80)
  # A user chunk under the budget is kept; one over it is lowered.
  assert memory.plan_scorer_batch(state, image, 500, budget, 10, 128, 16, 1) == (128, 16)
  assert memory.plan_scorer_batch(state, image, 500, budget, 10, 128, 64, 1) == (120, 40)
  # Everything fits: no chunking.
  assert memory.plan_scorer_batch(state, image, 500, budget, 10, 32, 0, 1) == (32, 0)


def test_too_small_budget_says_what_to_do():
  with pytest.raises(ValueError, match='memory_budget_gb'):
    memory.plan_scorer_batch(GIB, 0, 0, 0.5 * GIB, 10, 64, 0, 1)


def test_celeba_size_network_fits_16_gb_by_default():
  """52.5M parameters, K = 10, bfloat16 on a 16 GB accelerator with the automatic budget."""

  class FakeGpu:
    platform = 'gpu'

    def memory_stats(self):
      return {'bytes_limit': 16 * 10 ** 9}

  budget = memory.resolve_budget_bytes(0.0, FakeGpu())
  assert budget == pytest.approx(0.75 * 16e9)
  state = memory.unet_state_bytes(**{**CELEBA, 'image_size': 64}, dtype_bytes=2)
  image = memory.scorer_image_bytes(64, 3, 20)
  fixed = 52_500_000 * (4 + 2)
  batch, chunk = memory.plan_scorer_batch(state, image, fixed, budget, 10, 256, 0, 1)
  assert 0 < chunk < 256 and batch % chunk == 0
  assert fixed + chunk * (10 * state + image) <= budget
  assert memory.resolve_budget_bytes(0.0, None) == math.inf          # CPU: no limit
  assert memory.resolve_budget_bytes(2.0, FakeGpu()) == 2 * GIB
  with pytest.raises(ValueError, match='memory_budget_gb'):
    memory.resolve_budget_bytes(-1.0, None)
