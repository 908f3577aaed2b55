"""Fixtures shared across test modules, registered once here rather than imported into each module."""

# tiny_model and tiny_model_dir (eval_helpers), slow_models (output_helpers).
pytest_plugins = ["eval_helpers", "output_helpers"]
