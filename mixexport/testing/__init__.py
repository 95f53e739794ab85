"""Test tooling shipped with the package (not product code): fuzzers and their payloads."""
