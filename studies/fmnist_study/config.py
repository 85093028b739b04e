"""The study's configurations: model, recipe, schedule, operating points, measuring, cost model.

Why the ``cpu`` defaults (to be confirmed on the validation split by the ``checks`` stage):

- **8 blocks** put EViT's prune blocks at 2, 4, 6 (depth/4, depth/2, 3·depth/4) and
  ImagePiece's re-tokenization just before each, at 1, 3, 5: the paper's shape. 6 blocks
  squeezed them to 1, 3, 4 and skipped a re-tokenization.
- **64 wide, 2 heads, patch 4 on the native 28 px** (7x7 = 49 tokens + class token): 22.4
  MMACs per image, about 2.1 min per epoch on the 2 idle cores (measured: 112-147 s). 96 wide
  (48 MMACs; a training step 1.55x slower) or 32 px (30 MMACs, 64 tokens) would push the whole
  study past 5 hours. Upscaling 28 px adds no information.
- **35 epochs, light augmentation, no drop path.** The first study's recipe (random-resized
  crops of 0.6-1, random erasing 0.25, 8 epochs) reached 83.4% validation top-1 on 6 blocks.
  This configuration's first recipe (crops of 0.8-1, flips, label smoothing 0.1, drop path 0.05,
  25 epochs; ``results/fashion_mnist/cpu/recipe/``) reached 90.06% validation and 89.52% test
  top-1, with training top-1 (augmented, drop path on) at 88.4%, below validation: the model
  under-fits, so the schedule is 1.4x longer and drop path is off. The ``checks`` stage stops
  the study when the baseline's validation top-1 is below ``baseline_val_target`` (90.5: test
  ran 0.54 below validation) so a session can lengthen the schedule before hours of fine-tunes.
- **Fine-tunes of 2 epochs** (keep rate warmed up over the first third, EViT's 100 of 300
  epochs): the previous 1-epoch fine-tune spent half its only epoch warming up and left EViT
  3.4 points below its baseline with pruning from block 1 of 6. The ``checks`` stage measures
  the EViT keep 0.7 gap on the validation split against ``ft_gap_target`` (1.5 points).

The ``gpu`` configuration is the issue's: 12 blocks, 192 wide (DeiT-Ti's width), Fashion-MNIST
upscaled to 56 px with patch 4 = DeiT's 196 tokens. ``smoke`` rehearses every stage in seconds
on a few hundred images (tests/test_study.py); its numbers mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL = "vit_tiny_patch16_224"  # timm ViT; patch, width, depth and heads from model_kwargs
COHERENT = "imagepiece_vit_tiny_patch16_224"  # the same with ImagePiece's local coherence bias

# The light recipe of every run (see the module docstring); a config may override entries.
RECIPE: dict[str, Any] = dict(
    aa=None, mixup=0.0, cutmix=0.0, color_jitter=0.0, scale=[0.8, 1.0], reprob=0.0, smoothing=0.1,
    hflip=0.5, drop_path=0.0, weight_decay=0.05, min_lr=1e-5,
)


@dataclass(frozen=True)
class CostModel:
    """Minutes of one epoch over ``images`` training images: a part that does not scale with the
    model's MACs (data loading, per-op overhead, the validation pass) plus one per forward MMAC.

    The ``cpu`` constants are fitted to the previous study's logged run times on this project's
    2-core machine (``results/fashion_mnist/log_full_run.txt``): the 22.6-MMAC baseline took
    2.6 min per 55,000-image epoch and the 6.9-MMAC ToMe r=20 fine-tune 1.8 min, so
    ``2.6 = a + 22.6 b`` and ``1.8 = a + 6.9 b`` give a = 1.45 min, b = 0.051 min/MMAC. An
    evaluation pass costs a third of a training pass per image (forward only). ``--plan``
    rescales the estimates by the measured/estimated ratio of the runs already finished.
    """

    epoch_min: float  # minutes per 55,000 training images, independent of MACs
    min_per_mmac: float  # minutes per 55,000 training images per forward MMAC per image
    note: str = ""

    def train(self, images: int, mmacs: float) -> float:
        return images / 55_000 * (self.epoch_min + self.min_per_mmac * mmacs)

    def forward(self, images: int, mmacs: float) -> float:
        return self.train(images, mmacs) / 3


CPU_COST = CostModel(1.45, 0.051, "fitted to the previous study's run times on 2 cores")
GPU_COST = CostModel(0.25, 1e-4, "a guess (H200-class GPU, 8 loader workers); not calibrated")
SMOKE_COST = CostModel(0.6, 0.05, "a guess for a few hundred images")


@dataclass(frozen=True)
class StudyConfig:
    name: str
    model_kwargs: dict[str, Any]
    img_size: int
    base_epochs: int
    ft_epochs: int
    # ImagePiece with the coherence stem from scratch (the paper's setting): as many epochs as
    # the baseline and its fine-tune together, so both routes to a reduced model train as long.
    stem_epochs: int
    seeds: tuple[int, ...]  # seed spread at the keep-0.7 and hyper points
    batch_size: int
    base_lr: float
    ft_lr: float
    warmup_epochs: int
    workers: int
    threads: int | None
    device: str
    cost: CostModel
    # Operating points: GMAC reductions (baseline GMACs / point GMACs) in order of priority;
    # "k07" is keep 0.7 (ToMe: r matched to EViT keep 0.7 by GMACs), "hyper" is ``hyper``.
    # Each method gets the first ``points_per_method`` targets it can reach within 6%.
    targets: tuple[float | str, ...] = (1.25, "k07", "hyper", 3.3, 2.0)
    points_per_method: int = 4
    hyper: float = 2.5  # the paper's hyper-speed regime, about 2.5x
    matched: tuple[float, ...] = (1.5, 2.5)  # GMAC reductions of the matched-compute table
    eval_batch: int = 256
    mask_images: int = 2000  # Table 4: first test images
    analysis_images: int = 500  # Tables 5-7: first test images
    bench_batch: int = 256
    bench_warmup: int = 3
    bench_runs: int = 30
    # Threads of the timing steps: the configuration's, whatever ``--threads`` a call trains with,
    # so a call with ``--threads 1`` finds (and reports) the speed measured at the study's threads.
    bench_threads: int | None = None
    baseline_val_target: float = 90.5  # val ran 0.54 above test for the 25-epoch baseline (recipe/)
    ft_gap_target: float = 1.5  # EViT keep 0.7 fine-tune vs baseline, val top-1 points
    tune_margin: float = 0.2  # least val gain over the default's seed mean to change a knob
    # Checks that failed and were accepted, with the reason (the study goes on past them without
    # --ignore-checks, and the report says so): check name -> the decision.
    accepted_checks: tuple[tuple[str, str], ...] = ()
    train_images: int = 55_000  # for the cost estimate only
    eval_images: int = 15_000  # val + test, for the cost estimate only
    recipe: dict[str, Any] = field(default_factory=dict)  # overrides of RECIPE

    @property
    def timing_threads(self) -> int | None:
        """Threads the speed steps run with (``bench_threads``, else ``threads``)."""
        return self.threads if self.bench_threads is None else self.bench_threads

    @property
    def depth(self) -> int:
        return int(self.model_kwargs["depth"])

    def recipe_values(self) -> dict[str, Any]:
        return {**RECIPE, **self.recipe}


CONFIGS: dict[str, StudyConfig] = {
    "cpu": StudyConfig(
        name="cpu", model_kwargs=dict(patch_size=4, embed_dim=64, num_heads=2, depth=8), img_size=28,
        base_epochs=35, ft_epochs=2, stem_epochs=37, seeds=(0, 1, 2), batch_size=128, base_lr=1e-3,
        ft_lr=2.5e-4, warmup_epochs=1, workers=1, threads=2, device="cpu", cost=CPU_COST,
        accepted_checks=(("EViT keep 0.7 fine-tune: val points below the baseline",
                          "1.54 against 1.5 on validation; the 3-seed mean gap is 1.13 on test and a "
                          "3-epoch fine-tune did not close it (1.76), so the 2-epoch fine-tunes stand "
                          "(docs/study.md, Checks)"),),
    ),
    "gpu": StudyConfig(
        name="gpu", model_kwargs=dict(patch_size=4, embed_dim=192, num_heads=3, depth=12), img_size=56,
        base_epochs=100, ft_epochs=10, stem_epochs=110, seeds=(0, 1, 2), batch_size=256, base_lr=1e-3,
        ft_lr=2.5e-4, warmup_epochs=5, workers=8, threads=None, device="cuda", cost=GPU_COST,
        mask_images=10_000, analysis_images=2000, bench_batch=1024,
        # 5.5 M parameters for 100 epochs: DeiT-style regularisation helps again.
        recipe=dict(reprob=0.25, drop_path=0.1, scale=[0.6, 1.0]),
    ),
    "smoke": StudyConfig(
        name="smoke", model_kwargs=dict(patch_size=4, embed_dim=16, num_heads=2, depth=8), img_size=28,
        base_epochs=1, ft_epochs=1, stem_epochs=1, seeds=(0, 1), batch_size=32, base_lr=1e-3,
        ft_lr=2.5e-4, warmup_epochs=0, workers=0, threads=1, device="cpu", cost=SMOKE_COST,
        eval_batch=64, mask_images=32, analysis_images=16, bench_batch=8, bench_warmup=1,
        bench_runs=2, baseline_val_target=0.0, ft_gap_target=100.0, train_images=440,
        eval_images=160,
    ),
}
