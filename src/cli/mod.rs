//! Command line: `dsflash <subcommand>`. Exit codes: 0 ok, 1 runtime error, 2 usage error.

mod inspect;
mod synth;

use clap::{Parser, Subcommand};
use std::io::Write;

#[derive(Parser, Debug)]
#[command(
    name = "dsflash",
    version,
    about = "Run DeepSeek-V4-Flash on one workstation"
)]
pub struct Cli {
    /// Extra notes on stderr (e.g. tensors in the checkpoint that the model does not use).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a checkpoint: config, layer pattern, tensors, bytes per component and per token.
    Inspect(inspect::InspectArgs),
    /// Write a random checkpoint in the official layout for any config (tests, benchmarks).
    Synth(synth::SynthArgs),
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let result = match &cli.command {
        Command::Inspect(a) => inspect::run(a, cli.verbose),
        Command::Synth(a) => synth::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            // Broken pipe on stdout (`| head`) is not an error worth reporting.
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return 0;
            }
            let mut msg = format!("{e}");
            // anyhow contexts: show the chain on one line.
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            1
        }
    }
}
