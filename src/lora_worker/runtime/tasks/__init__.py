"""The endpoint's tasks besides training: `generate` (an adapter's replies) and `list` (the adapters on
the volume); `spec.task_of` picks the task of a job input."""
