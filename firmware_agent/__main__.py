"""``python -m firmware_agent run --config PATH``."""

from __future__ import annotations

from .cli import agent

if __name__ == "__main__":
    agent(prog_name="python -m firmware_agent")
