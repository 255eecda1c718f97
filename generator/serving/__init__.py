"""Serving: render and validate the Triton repository, run tritonserver, the clients and the deploy files."""
