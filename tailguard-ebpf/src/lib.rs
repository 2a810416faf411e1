//! Nothing to see here: the programs are the `tailguard` binary of this crate
//! (`src/main.rs`). This library target lets the daemon depend on the crate so
//! cargo rebuilds the daemon when the programs change.
#![no_std]
