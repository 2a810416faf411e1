//! `tailguard-bench` (run by `cargo xtask bench`, as root): measures, never
//! asserts. So far the per-packet cost of each main path of the fast path,
//! by `BPF_PROG_TEST_RUN`, next to a program that only redirects (the floor).
//!
//! Each measurement is one run of the program on a fresh copy of the packet
//! (`repeat = 1`): with a larger repeat the kernel runs the program again on
//! the same, already rewritten packet, which would measure other paths. The
//! kernel times the run itself (its `duration` excludes the system call);
//! the median of many runs is reported.

mod per_packet;

use anyhow::Result;

fn main() -> Result<()> {
    let results = per_packet::run()?;
    let json = serde_json::json!({ "per_packet": results.iter().map(per_packet::Row::to_json).collect::<Vec<_>>() });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("per-packet.json"), format!("{json:#}\n"))?;
    let table = per_packet::markdown(&results);
    std::fs::write(dir.join("per-packet.md"), &table)?;
    print!("{table}");
    println!("\n(written to {})", dir.display());
    Ok(())
}
