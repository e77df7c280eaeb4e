//! multitoken-moe: see ARCHITECTURE.md ("multitoken-moe").
//!
//! This crate is being built; its command-line entry point is [`cli`].

pub mod cli;
