"""An example jobvisor plug-in and job types (see docs/job_types.md)."""
