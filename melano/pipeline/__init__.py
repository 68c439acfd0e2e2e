"""The experiment, end to end: does CycleGAN oversampling beat traditional augmentation, and does
it beat simply resampling the real melanomas? `python -m melano.pipeline --help` lists the stages
and options. Read in this order:

    experiment   `run_stages`: the method, top to bottom
    stages       what each stage does (data, second clinic, GAN run, translations, arm, quality, report)
    config       the arms, the presets, the options (the trainers' own composed in)
    runner       skip, resume, side by side, child processes and signals
    cli          the command line
"""

from .cli import main, parse_config
from .config import (ALIASES, ARMS, GAN_ARMS, PRESETS, PipelineConfig, arm_config, gan_config, make_config,
                     stage_names)
from .experiment import run_experiment
from .runner import Stages, default_jobs, train_process

__all__ = ["main", "parse_config", "ALIASES", "ARMS", "GAN_ARMS", "PRESETS", "PipelineConfig", "arm_config",
           "gan_config", "make_config", "stage_names", "run_experiment", "Stages", "default_jobs", "train_process"]
