"""The shipped demo model (artifacts/demo-moe): training from seeds, baseline accuracy, model card."""
