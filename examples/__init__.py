"""Runnable examples; each is imported and run by a test (``from examples.hello import app``)."""
