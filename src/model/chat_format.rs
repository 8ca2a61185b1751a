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
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            reasoning_content: None,
            tool_calls: None,
            tools: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChatError {
    #[error("message {0}: tool calls and tool results are not supported yet")]
    Tools(usize),
}

/// Render a conversation to the prompt text (spec §8.1). The result starts with BOS and, when
/// the last message is a user turn, ends with the assistant opener.
pub fn render(f: &ChatFormat, messages: &[Message], mode: Mode) -> Result<String, ChatError> {
    if let Some(i) = messages
        .iter()
        .position(|m| m.role == Role::Tool || m.tool_calls.is_some() || m.tools.is_some())
    {
        return Err(ChatError::Tools(i));
    }
    let thinking = mode.thinking();
    let last_user = messages.iter().rposition(|m| m.role == Role::User);
    let mut out = String::from(f.bos);
    if mode == Mode::ThinkMax {
        out.push_str(f.max_effort_prefix);
    }
    for (i, m) in messages.iter().enumerate() {
        // In thinking mode, earlier reasoning is dropped, and so are developer messages
        // before the last user turn.
        let before_last_user = last_user.is_some_and(|lu| i < lu);
        match m.role {
            Role::System => out.push_str(&m.content),
            Role::User | Role::Developer => {
                if m.role == Role::Developer && thinking && before_last_user {
                    continue;
                }
                out.push_str(f.user);
                out.push_str(&m.content);
                let next = messages.get(i + 1).map(|n| n.role);
                let transition = matches!(
                    next,
                    None | Some(Role::Assistant) | Some(Role::LatestReminder)
                );
                if transition {
                    out.push_str(f.assistant);
                    let opener = if thinking && Some(i) == last_user {
                        f.think_open
                    } else {
                        f.think_close
                    };
                    out.push_str(opener);
                }
            }
            Role::Assistant => {
                if thinking && !before_last_user {
                    if let Some(r) = &m.reasoning_content {
                        out.push_str(r);
                    }
                    out.push_str(f.think_close);
                }
                out.push_str(&m.content);
                out.push_str(f.eos);
            }
            Role::LatestReminder => {
                out.push_str(f.latest_reminder);
                out.push_str(&m.content);
            }
            Role::Tool => unreachable!("rejected above"),
        }
    }
    Ok(out)
}

/// Split a generated thinking-mode completion: reasoning, then `</think>`, then the answer.
pub fn split_reasoning<'a>(f: &ChatFormat, text: &'a str) -> (Option<&'a str>, &'a str) {
    match text.find(f.think_close) {
        Some(i) => (Some(&text[..i]), &text[i + f.think_close.len()..]),
        None => (None, text),
    }
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
        let (r, a) = split_reasoning(&DSV4, "Simple arithmetic.</think>2 + 2 = 4.");
        assert_eq!((r, a), (Some("Simple arithmetic."), "2 + 2 = 4."));
    }

    #[test]
    fn assistant_after_last_user_keeps_reasoning_and_tools_are_refused() {
        let mut m = sys_user();
        let mut a = Message::new(Role::Assistant, "2 + 2 = 4.");
        a.reasoning_content = Some("Simple arithmetic.".into());
        m.push(a);
        assert_eq!(
            render(&DSV4, &m, Mode::Think).unwrap(),
            "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>Simple arithmetic.</think>2 + 2 = 4.<｜end▁of▁sentence｜>"
        );
        m.push(Message::new(Role::Tool, "{}"));
        assert_eq!(render(&DSV4, &m, Mode::Think), Err(ChatError::Tools(3)));
    }
}
