//! Writes every target's hand-written seeds as a libFuzzer corpus:
//! `cargo run -p fuzz-targets --example write_seeds -- DIR` creates
//! `DIR/<target>/seed-<n>`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for (name, _) in fuzz_targets::TARGETS {
        let target_dir = dir.join(name);
        std::fs::create_dir_all(&target_dir)?;
        for (i, seed) in fuzz_targets::seeds::for_target(name).iter().enumerate() {
            std::fs::write(target_dir.join(format!("seed-{i}")), seed)?;
        }
    }
    Ok(())
}
