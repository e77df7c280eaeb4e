//! multitoken-train: see ARCHITECTURE.md ("multitoken-train").
//!
//! This crate is being built; its command-line entry point is [`cli`].

pub mod cli;
