//! multitoken-serve: see ARCHITECTURE.md ("multitoken-serve").
//!
//! This crate is being built; its command-line entry point is [`cli`].

pub mod cli;
