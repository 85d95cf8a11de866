"""The learning pipeline's job handlers: one module per stage."""
