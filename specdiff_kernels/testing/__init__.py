"""Statistics shared by the tests and the benchmarks: two-sample tests (:mod:`.two_sample`)."""
