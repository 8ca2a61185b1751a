//! Command line: `dsflash <subcommand>`. Exit codes: 0 ok, 1 runtime error, 2 usage error.

mod inspect;
pub mod run;
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
    /// Worker threads for the compute (default: one per core).
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a checkpoint: config, layer pattern, tensors, bytes per component and per token.
    Inspect(inspect::InspectArgs),
    /// Write a random checkpoint in the official layout for any config (tests, benchmarks).
    Synth(synth::SynthArgs),
    /// Logits of a prompt given as token ids, written as a float32 .npy [T, vocab].
    Logits(run::LogitsArgs),
    /// Continue a prompt given as token ids; prints the new ids.
    Generate(run::GenerateArgs),
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
    if let Some(n) = cli.threads {
        // Fails only if a pool already exists (not the case at start-up).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build_global();
    }
    let result = match &cli.command {
        Command::Inspect(a) => inspect::run(a, cli.verbose),
        Command::Synth(a) => synth::run(a),
        Command::Logits(a) => run::logits(a),
        Command::Generate(a) => run::generate(a),
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
