//! The helper commands beside the daemon (`tailguard wg-pair`, ...).

pub mod wg_pair;
