"""The permitgate test suite."""
