//! Helpers shared by the decode tests: fixture paths, deterministic prompts,
//! the greedy pick.

#![allow(dead_code)]

use std::path::PathBuf;

/// The tiny transformers-saved fixture of `family` (`tests/fixtures/lm`).
pub fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lm").join(family)
}

/// Deterministic prompt ids below `vocab`.
pub fn prompt(len: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// The first index of the largest value.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}
