"""Training: pure torch cores (LR schedule, optimizer groups, train step, evaluation,
checkpoints) and the Ray Train wiring in ``ray_train.py``."""
