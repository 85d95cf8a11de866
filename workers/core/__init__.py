"""The queue core: queue SQL, the child runtime, the job context, the handler registry.

It knows no job type of any plug-in (docs/architecture.md)."""
