"""The command-line runner: config -> objects -> one episodic training loop."""
