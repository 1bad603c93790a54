"""Built-in job types. Each module declares one actor with `engine.actor`."""
