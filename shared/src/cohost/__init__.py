"""Common code of the cohost project: messages, logging, GPU planning, launcher."""
