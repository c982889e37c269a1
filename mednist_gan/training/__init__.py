"""The training run: the loop, one GAN step, optimizers and schedule, stopping, evaluation during
training, tracking and the run's records."""
