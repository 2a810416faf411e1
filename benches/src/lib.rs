//! Benchmarks (`benches/`): the fast path against the kernel path, run by
//! `cargo bench -p tailguard-benches`, never as tests. The first ones come
//! with the benchmark issue; this crate holds their place in the layout.
