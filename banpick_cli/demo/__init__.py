"""The shipped demo model (banpick_cli/artifacts/demo-moe): training from seeds, baseline accuracy, model card."""
