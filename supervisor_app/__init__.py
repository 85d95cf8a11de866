"""The jobvisor supervisor: CLI, config, capacity planning, child processes, HTTP."""
