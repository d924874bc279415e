"""Agent backends and the tools they act through."""
