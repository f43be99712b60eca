"""Test helpers shared by several test modules: fakes, fixtures, launchers."""
