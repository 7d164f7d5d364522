"""The reliability suite (`hierspec reliability`, `make reliability`) and the real Redis server it and the tests run."""

CASES = ("auth", "limits", "faults", "fuzz", "soak", "storage", "node-loss")  # in the order the suite runs them
