"""CLI commands that need more than their stage module (see each module for why)."""
