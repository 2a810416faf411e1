//! What the project's tasks and tailguard's build script agree on: the pinned
//! eBPF toolchain and where its bpf-linker lives.
pub mod toolchain;
