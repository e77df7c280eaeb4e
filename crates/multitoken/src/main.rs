//! The `multitoken` command line.

fn main() {}
