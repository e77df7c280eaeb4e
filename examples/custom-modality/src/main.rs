//! `sensor-multitoken`: the `multitoken` command line with one more modality.
//!
//! `use sensor_series as _` keeps the crate, and so its registry entry, in the
//! binary; every subcommand (`generate`, `chat`, `train`, `eval`, `serve`,
//! `modality add`, ...) then knows `sensor_series`.

use sensor_series as _;

fn main() -> anyhow::Result<()> {
    multitoken::cli::main()
}
