"""Test code shared by tests/ and bench/ (not installed): importable because pytest runs from the repository
root, whose conftest.py puts the root on sys.path."""
