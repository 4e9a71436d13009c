"""Task evaluators: they belong to the task, not the method; one serves every method with the capability."""
