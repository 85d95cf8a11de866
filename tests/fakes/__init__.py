"""Test doubles for services jobvisor talks to (Ollama)."""
