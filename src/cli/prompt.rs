//! `dsflash prompt --messages FILE.json`: print the rendered prompt (text or ids), so anyone
//! can check it against the reference encoder.

use super::ModeArgs;
use crate::model::chat_format::{DSV4, Message, render};
use crate::model::tokenizer::Tokenizer;
use anyhow::Context;
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
pub enum PromptFormat {
    Text,
    Ids,
}

#[derive(Args, Debug)]
pub struct PromptArgs {
    /// A JSON array of messages in the OpenAI chat format (assistant messages may carry
    /// `reasoning_content`); `-` reads it from stdin.
    #[arg(long)]
    pub messages: PathBuf,
    #[command(flatten)]
    pub mode: ModeArgs,
    #[arg(long, value_enum, default_value_t = PromptFormat::Text)]
    pub format: PromptFormat,
    /// tokenizer.json (for --format ids).
    #[arg(long, conflicts_with = "model")]
    pub tokenizer: Option<PathBuf>,
    /// A checkpoint directory or repo id whose tokenizer.json to use (for --format ids).
    #[arg(long)]
    pub model: Option<String>,
}

pub fn run(a: &PromptArgs) -> anyhow::Result<()> {
    let bytes = if a.messages.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).context("--messages -: stdin")?;
        b
    } else {
        crate::fsutil::read_regular(&a.messages)
            .with_context(|| format!("--messages {}", a.messages.display()))?
    };
    let msgs: Vec<Message> = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "--messages {}: not a JSON array of chat messages: {e}",
            a.messages.display()
        )
    })?;
    let text = render(&DSV4, &msgs, a.mode.mode())?;
    // A tokenizer given explicitly is checked even where the text alone is printed.
    if a.format == PromptFormat::Text
        && let Some(t) = &a.tokenizer
    {
        Tokenizer::from_file(t)?;
    }
    let mut out = std::io::stdout().lock();
    match a.format {
        PromptFormat::Text => write!(out, "{text}")?,
        PromptFormat::Ids => {
            let path = match (&a.tokenizer, &a.model) {
                (Some(t), _) => t.clone(),
                (None, Some(m)) => crate::hub::resolve_model(m)?.join("tokenizer.json"),
                (None, None) => {
                    anyhow::bail!("--format ids needs --tokenizer FILE or --model PATH")
                }
            };
            let ids = Tokenizer::from_file(&path)?.encode(&text)?;
            let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            writeln!(out, "{}", s.join(","))?;
        }
    }
    out.flush()?;
    Ok(())
}
