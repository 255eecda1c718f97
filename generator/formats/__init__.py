"""What lies on disk between the stages; imports nothing of gen-repo above `generator.errors`."""
