"""The composition root: CLI, recipe schema, builders, backends, tracking and the run lifecycle.

The only package that knows Lightning, TRL, DeepSpeed and wandb.
"""
