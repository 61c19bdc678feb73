//! Logging: a tracing subscriber filtered by `RUST_LOG` (default `info`), in colour only on a
//! terminal (a log file or a CI log gets plain text).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let colour = std::io::stdout().is_terminal();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(colour).try_init();
}
