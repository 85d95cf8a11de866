"""Example jobvisor job types (see docs/job_types.md)."""
