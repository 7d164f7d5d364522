"""The benchmarks: `hierspec bench` (in-process), `hierspec bench-serve` (the Serve app under clients), charts."""
