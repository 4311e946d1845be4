"""Code the tests share that is not a fixture of every test: see each module."""
