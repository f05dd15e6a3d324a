//! `host-agent`: see the crate docs of the `host_agent` library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// rcsync host agent: syncs host RuntimeClasses to virtual clusters, per tenant, over gRPC.
#[derive(Parser, Debug)]
#[command(name = "host-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a tenants file (or a vcluster.yaml) and print what it configures; exits non-zero
    /// with every problem, each naming its path in the file.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match host_agent::check::check_config(&file) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
