//! Many real nodes in one process (benchmarks and simulations).
