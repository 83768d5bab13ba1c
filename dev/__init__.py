"""Development tools that are not part of the pgws wheel: a throwaway PostgreSQL for tests,
`make run` and benchmarks (devdb), and the `make run` demo launcher (demo)."""
