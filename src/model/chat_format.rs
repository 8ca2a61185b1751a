//! The DeepSeek-V4 chat encoding (spec §8), data-driven: a `ChatFormat` table holds every
//! literal, `render` holds the rules. A later variant (e.g. the 0731 release) is another table.

use serde::{Deserialize, Serialize};

/// Literals of one chat format.
#[derive(Debug, Clone)]
pub struct ChatFormat {
    pub bos: &'static str,
    pub eos: &'static str,
    pub user: &'static str,
    pub assistant: &'static str,
    pub think_open: &'static str,
    pub think_close: &'static str,
    pub latest_reminder: &'static str,
    /// Prepended after BOS in "max" reasoning effort.
    pub max_effort_prefix: &'static str,
    /// Token id that ends an assistant turn.
    pub eos_id: u32,
    /// Token id of `think_close` (splits reasoning from the answer in generated output).
    pub think_close_id: u32,
}

/// DeepSeek-V4-Flash as released (encoding/encoding_dsv4.py).
pub const DSV4: ChatFormat = ChatFormat {
    bos: "<｜begin▁of▁sentence｜>",
    eos: "<｜end▁of▁sentence｜>",
    user: "<｜User｜>",
    assistant: "<｜Assistant｜>",
    think_open: "<think>",
    think_close: "</think>",
    latest_reminder: "<｜latest_reminder｜>",
    max_effort_prefix: "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n",
    eos_id: 1,
    think_close_id: 128822,
};

/// Thinking mode of a conversation (the model card's three modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// "Non-think": the assistant answers directly.
    Chat,
    /// "Think High": the assistant reasons first.
    Think,
    /// "Think Max": reasoning with the maximum-effort instruction.
    ThinkMax,
}

impl Mode {
    pub fn thinking(self) -> bool {
        self != Mode::Chat
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    Developer,
    LatestReminder,
    Tool,
}

/// `content` as OpenAI sends it: a string, null, or `[{"type": "text", "text": ...}, ...]`.
fn content_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    use serde_json::Value;
    match Value::deserialize(d)? {
        Value::String(t) => Ok(t),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.clone()),
                    (Some("text"), _) => {
                        return Err(D::Error::custom(
                            "content: a text part without a `text` string",
                        ));
                    }
                    (Some(other), _) => {
                        return Err(D::Error::custom(format!(
                            "content: parts of type {other:?} are not supported (text only)"
                        )));
                    }
                    (None, _) => return Err(D::Error::custom("content: a part without `type`")),
                }
            }
            Ok(texts.join("\n"))
        }
        other => Err(D::Error::custom(format!(
            "content: expected a string or an array of text parts, got {other}"
        ))),
    }
}

/// One message in the OpenAI chat format (plus DeepSeek's `reasoning_content`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Message {
    pub role: Role,
    /// A string, or OpenAI's array of content parts (text parts only), joined by newlines.
    #[serde(default, deserialize_with = "content_text")]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<serde_json::Value>,
    /// A tool result's call (role `tool`): orders the results as the calls were made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The last message only, an assistant's: the start of the answer, which the model
    /// continues (DeepSeek's "chat prefix completion"; the release encoder's `wo_eos`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prefix: bool,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            reasoning_content: None,
            tool_calls: None,
            tools: None,
            tool_call_id: None,
            prefix: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChatError {
    #[error("message {0}: {1}")]
    Message(usize, String),
}

/// A non-empty array, object or string: what the release's encoder takes as present.
fn present(v: &Option<serde_json::Value>) -> bool {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(t)) => !t.is_empty(),
        Some(_) => true,
    }
}

/// A part of a user turn: its text, or a tool's result merged into it.
#[derive(Debug, Clone, Copy)]
enum Block<'a> {
    Text(&'a str),
    ToolResult { call: &'a str, content: &'a str },
}

/// A message after the encoder's preprocessing: `tool` results and consecutive user messages
/// merged into one user turn (spec §8.1).
#[derive(Debug, Clone)]
struct Turn<'a> {
    /// Index of the (first) message it came from, for errors.
    at: usize,
    m: &'a Message,
    blocks: Vec<Block<'a>>,
}

/// Merge tool results and user messages into user turns, then put each turn's tool results
/// in the order of the calls of the assistant turn before it.
fn merge_turns(messages: &[Message]) -> Vec<Turn<'_>> {
    let mut turns: Vec<Turn> = Vec::new();
    for (at, m) in messages.iter().enumerate() {
        let block = match m.role {
            Role::Tool => Block::ToolResult {
                call: m.tool_call_id.as_deref().unwrap_or(""),
                content: &m.content,
            },
            Role::User => Block::Text(&m.content),
            _ => {
                turns.push(Turn {
                    at,
                    m,
                    blocks: Vec::new(),
                });
                continue;
            }
        };
        match turns.last_mut() {
            Some(t) if t.m.role == Role::User || t.m.role == Role::Tool => t.blocks.push(block),
            _ => turns.push(Turn {
                at,
                m,
                blocks: vec![block],
            }),
        }
    }
    let mut order: Vec<String> = Vec::new();
    for t in &mut turns {
        match t.m.role {
            Role::Assistant if present(&t.m.tool_calls) => {
                order =
                    t.m.tool_calls
                        .iter()
                        .flat_map(|c| c.as_array())
                        .flatten()
                        .map(|c| {
                            let id = c
                                .get("id")
                                .and_then(|v| v.as_str())
                                .filter(|s| !s.is_empty());
                            let id = id.or_else(|| c.get("function")?.get("id")?.as_str());
                            id.unwrap_or("").to_string()
                        })
                        .collect();
            }
            Role::User | Role::Tool => {
                let results: Vec<Block> = t
                    .blocks
                    .iter()
                    .copied()
                    .filter(|b| matches!(b, Block::ToolResult { .. }))
                    .collect();
                if results.len() > 1 && order.iter().any(|id| !id.is_empty()) {
                    let rank = |b: &Block| match b {
                        Block::ToolResult { call, .. } => order
                            .iter()
                            .position(|id| !id.is_empty() && id == call)
                            .unwrap_or(0),
                        Block::Text(_) => 0,
                    };
                    let mut sorted = results;
                    sorted.sort_by_key(rank);
                    let mut next = sorted.into_iter();
                    for b in &mut t.blocks {
                        if matches!(b, Block::ToolResult { .. }) {
                            *b = next.next().unwrap_or(*b);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    turns
}

/// Index of the last user or developer turn.
fn last_user(turns: &[Turn]) -> Option<usize> {
    turns
        .iter()
        .rposition(|t| matches!(t.m.role, Role::User | Role::Tool | Role::Developer))
}

/// Render a conversation to the prompt text (spec §8.1), as the release's encoder does. The
/// result starts with BOS and, when the last message is a user turn, ends with the assistant
/// opener. With tools anywhere, every turn keeps its reasoning.
pub fn render(f: &ChatFormat, messages: &[Message], mode: Mode) -> Result<String, ChatError> {
    let thinking = mode.thinking();
    if let Some(at) = messages.iter().position(|m| m.prefix)
        && (at + 1 != messages.len() || messages[at].role != Role::Assistant)
    {
        return Err(ChatError::Message(
            at,
            "`prefix` is only for the last message, an assistant's".into(),
        ));
    }
    let mut turns = merge_turns(messages);
    let drop = !messages.iter().any(|m| present(&m.tools));
    if thinking && drop {
        // Developer turns before the last user turn go (assistant turns there lose their
        // reasoning: see below).
        let lu = last_user(&turns);
        let before = |i: usize| lu.is_some_and(|lu| i < lu);
        turns = turns
            .into_iter()
            .enumerate()
            .filter(|(i, t)| !(t.m.role == Role::Developer && before(*i)))
            .map(|(_, t)| t)
            .collect();
    }
    let lu = last_user(&turns);
    let mut out = String::from(f.bos);
    for (i, t) in turns.iter().enumerate() {
        let m = t.m;
        let bad = |e: crate::model::dsml::DsmlError| ChatError::Message(t.at, e.0);
        if i == 0 && mode == Mode::ThinkMax {
            out.push_str(f.max_effort_prefix);
        }
        let tools = match &m.tools {
            Some(v) if present(&m.tools) => {
                format!("\n\n{}", crate::model::dsml::tools_block(v).map_err(bad)?)
            }
            _ => String::new(),
        };
        match m.role {
            Role::System => {
                out.push_str(&m.content);
                out.push_str(&tools);
            }
            Role::Developer => {
                if m.content.is_empty() {
                    return Err(ChatError::Message(
                        t.at,
                        "a developer message needs content".into(),
                    ));
                }
                out.push_str(f.user);
                out.push_str(&m.content);
                out.push_str(&tools);
            }
            Role::User | Role::Tool => {
                out.push_str(f.user);
                for (k, b) in t.blocks.iter().enumerate() {
                    if k > 0 {
                        out.push_str("\n\n");
                    }
                    match b {
                        Block::Text(text) => out.push_str(text),
                        Block::ToolResult { content, .. } => {
                            out.push_str("<tool_result>");
                            out.push_str(content);
                            out.push_str("</tool_result>");
                        }
                    }
                }
            }
            Role::Assistant => {
                let calls = match &m.tool_calls {
                    Some(v) if present(&m.tool_calls) => {
                        crate::model::dsml::calls_block(v).map_err(bad)?
                    }
                    _ => String::new(),
                };
                let after_last_user = lu.is_none_or(|lu| i > lu);
                if thinking && (!drop || after_last_user) {
                    if let Some(r) = &m.reasoning_content {
                        out.push_str(r);
                    }
                    out.push_str(f.think_close);
                }
                out.push_str(&m.content);
                out.push_str(&calls);
                if !m.prefix {
                    out.push_str(f.eos);
                }
            }
            Role::LatestReminder => {
                out.push_str(f.latest_reminder);
                out.push_str(&m.content);
            }
        }
        // The assistant opener after a user turn that the model answers next.
        let next = turns.get(i + 1).map(|n| n.m.role);
        let answered = matches!(
            next,
            None | Some(Role::Assistant) | Some(Role::LatestReminder)
        );
        if answered && matches!(m.role, Role::User | Role::Tool | Role::Developer) {
            out.push_str(f.assistant);
            let open = thinking && (!drop || lu.is_some_and(|lu| i >= lu));
            out.push_str(if open { f.think_open } else { f.think_close });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys_user() -> Vec<Message> {
        vec![
            Message::new(Role::System, "You are a helpful assistant."),
            Message::new(Role::User, "What is 2+2?"),
        ]
    }

    #[test]
    fn openai_content_parts_render_like_the_string() {
        // The same conversation as spec example A, the user turn as a content-part array.
        let m: Vec<Message> = serde_json::from_str(
            r#"[{"role":"system","content":"You are a helpful assistant."},
                {"role":"user","content":[{"type":"text","text":"What is 2+2?"}]}]"#,
        )
        .unwrap();
        assert_eq!(m, sys_user());
        let m: Vec<Message> = serde_json::from_str(
            r#"[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null}]"#,
        )
        .unwrap();
        assert_eq!((m[0].content.as_str(), m[1].content.as_str()), ("a\nb", ""));
        let e = serde_json::from_str::<Vec<Message>>(
            r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("\"image_url\"") && e.contains("text only"),
            "{e}"
        );
    }

    #[test]
    fn spec_example_a_chat_mode() {
        assert_eq!(
            render(&DSV4, &sys_user(), Mode::Chat).unwrap(),
            "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜></think>"
        );
    }

    #[test]
    fn spec_example_b_thinking_mode() {
        assert_eq!(
            render(&DSV4, &sys_user(), Mode::Think).unwrap(),
            "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>"
        );
    }

    fn multi_turn() -> Vec<Message> {
        let mut a = Message::new(Role::Assistant, "Hi! How can I help?");
        a.reasoning_content = Some("The user greets me.".into());
        vec![
            Message::new(Role::System, "You are a helpful assistant."),
            Message::new(Role::User, "Hello"),
            a,
            Message::new(Role::User, "What is 2+2?"),
        ]
    }

    #[test]
    fn spec_example_c_multi_turn_drops_earlier_reasoning() {
        let want = "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>Hi! How can I help?<｜end▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>";
        assert_eq!(render(&DSV4, &multi_turn(), Mode::Think).unwrap(), want);
        // Chat mode: the same with a final </think>.
        let chat = want.strip_suffix("<think>").unwrap().to_string() + "</think>";
        assert_eq!(render(&DSV4, &multi_turn(), Mode::Chat).unwrap(), chat);
    }

    #[test]
    fn spec_example_d_think_max() {
        let m = vec![Message::new(Role::User, "What is 2+2?")];
        let want = "<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n<｜User｜>What is 2+2?<｜Assistant｜><think>";
        assert_eq!(render(&DSV4, &m, Mode::ThinkMax).unwrap(), want);
        // "max" is ignored in chat mode.
        assert!(
            !render(&DSV4, &m, Mode::Chat)
                .unwrap()
                .contains("Reasoning Effort")
        );
    }

    #[test]
    fn spec_example_e_parse_completion() {
        let p = crate::model::dsml::parse_completion(
            &DSV4,
            "Simple arithmetic.</think>2 + 2 = 4.<｜end▁of▁sentence｜>",
            true,
        )
        .unwrap();
        assert_eq!(
            (p.reasoning_content.as_str(), p.content.as_str()),
            ("Simple arithmetic.", "2 + 2 = 4.")
        );
    }

    #[test]
    fn assistant_after_last_user_keeps_reasoning() {
        let mut m = sys_user();
        let mut a = Message::new(Role::Assistant, "2 + 2 = 4.");
        a.reasoning_content = Some("Simple arithmetic.".into());
        m.push(a);
        assert_eq!(
            render(&DSV4, &m, Mode::Think).unwrap(),
            "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>Simple arithmetic.</think>2 + 2 = 4.<｜end▁of▁sentence｜>"
        );
    }
}
