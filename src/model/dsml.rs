//! Tool calls in DeepSeek-V4's markup, DSML (spec §8.1): the tools block of a system or
//! developer message, an assistant turn's calls, and the parser of a completion into
//! reasoning, content and OpenAI-style `tool_calls`. Values are written as the release's
//! encoder writes them: Python's `json.dumps(..., ensure_ascii=False)`, keys in their order.

use super::chat_format::ChatFormat;
use serde_json::Value;

const DSML: &str = "｜DSML｜";

/// The instructions and schemas appended to a system or developer message that has tools.
const TOOLS_HEAD: &str = "## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name=\"$TOOL_NAME\">
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name=\"$TOOL_NAME2\">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

";
const TOOLS_TAIL: &str = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

/// A request's tools or calls that cannot be rendered, or a completion that does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DsmlError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, DsmlError> {
    Err(DsmlError(msg.into()))
}

/// `json.dumps(v, ensure_ascii=False)`: ", " and ": " separators, non-ASCII as is, floats as
/// Python's repr.
pub fn py_json(v: &Value) -> String {
    let mut s = String::new();
    write_json(&mut s, v);
    s
}

fn write_json(s: &mut String, v: &Value) {
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => s.push_str(&i.to_string()),
            (_, Some(u), _) => s.push_str(&u.to_string()),
            (_, _, Some(f)) => s.push_str(&py_float(f)),
            _ => s.push_str(&n.to_string()),
        },
        Value::String(t) => write_str(s, t),
        Value::Array(a) => {
            s.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                write_json(s, x);
            }
            s.push(']');
        }
        Value::Object(o) => {
            s.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                write_str(s, k);
                s.push_str(": ");
                write_json(s, x);
            }
            s.push('}');
        }
    }
}

fn write_str(s: &mut String, t: &str) {
    s.push('"');
    for c in t.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            c if (c as u32) < 0x20 => s.push_str(&format!("\\u{:04x}", c as u32)),
            c => s.push(c),
        }
    }
    s.push('"');
}

/// Python's `repr(float)`: the shortest digits that read back, positional for decimal
/// exponents -4..16, else `d.ddde+XX`.
fn py_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut out = String::from(if neg { "-" } else { "" });
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        } else {
            let point = exp as usize + 1;
            if digits.len() <= point {
                out.push_str(&digits);
                out.push_str(&"0".repeat(point - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..point]);
                out.push('.');
                out.push_str(&digits[point..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push_str(&format!(
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        ));
    }
    out
}

/// The tools block for OpenAI-style `tools` (`[{"type": "function", "function": {...}}]`):
/// each function's schema as one JSON line.
pub fn tools_block(tools: &Value) -> Result<String, DsmlError> {
    let Some(list) = tools.as_array() else {
        return err("tools: expected an array");
    };
    let mut schemas = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        match t.get("function") {
            Some(f @ Value::Object(_)) => schemas.push(py_json(f)),
            _ => {
                return err(format!(
                    "tools[{i}]: expected {{\"type\": \"function\", \"function\": {{...}}}}"
                ));
            }
        }
    }
    Ok(format!("{TOOLS_HEAD}{}{TOOLS_TAIL}", schemas.join("\n")))
}

/// An assistant turn's OpenAI-style `tool_calls` as the DSML block that follows its content
/// (starting with the blank line).
pub fn calls_block(calls: &Value) -> Result<String, DsmlError> {
    let Some(list) = calls.as_array() else {
        return err("tool_calls: expected an array");
    };
    let mut invokes = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let f = c.get("function");
        let Some(name) = f.and_then(|f| f.get("name")).and_then(Value::as_str) else {
            return err(format!("tool_calls[{i}]: no function name"));
        };
        // The arguments are a JSON object in a string; anything else is one argument
        // named "arguments", as the release's encoder has it.
        let raw = f.and_then(|f| f.get("arguments")).unwrap_or(&Value::Null);
        let args = match raw.as_str().map(serde_json::from_str::<Value>) {
            Some(Ok(Value::Object(o))) => o,
            Some(Ok(other)) => {
                return err(format!(
                    "tool_calls[{i}]: arguments must be a JSON object, got {}",
                    py_json(&other)
                ));
            }
            _ => serde_json::Map::from_iter([("arguments".to_string(), raw.clone())]),
        };
        let params: Vec<String> = args
            .iter()
            .map(|(k, v)| {
                let (is_str, text) = match v {
                    Value::String(s) => ("true", s.clone()),
                    other => ("false", py_json(other)),
                };
                format!(
                    "<{DSML}parameter name=\"{k}\" string=\"{is_str}\">{text}</{DSML}parameter>"
                )
            })
            .collect();
        invokes.push(format!(
            "<{DSML}invoke name=\"{name}\">\n{}\n</{DSML}invoke>",
            params.join("\n")
        ));
    }
    Ok(format!(
        "\n\n<{DSML}tool_calls>\n{}\n</{DSML}tool_calls>",
        invokes.join("\n")
    ))
}

/// One call parsed from a completion: the name and the arguments as a JSON object's text.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A completion taken apart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    pub reasoning_content: String,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

/// Where a completion's tool calls start.
const CALLS_START: &str = "\n\n<｜DSML｜tool_calls";

/// Streamed answer text split at the start of a tool-call block: what comes before it can go
/// out as content as it arrives (holding back a tail that may still become the block's
/// start); from the block on, the text is kept for `parse_completion` at the end.
#[derive(Debug, Default)]
pub struct CallSplitter {
    text: String,
    /// Bytes of `text` given out as content, or held back as the client's own prefix.
    sent: usize,
    /// Bytes of `text` that the client wrote (never given out).
    hidden: usize,
    calls_at: Option<usize>,
}

impl CallSplitter {
    /// Text that is already part of the answer (a prefix the client wrote): never given
    /// out as content, but a block may start in it.
    pub fn with_prefix(prefix: &str) -> CallSplitter {
        let mut s = CallSplitter::default();
        s.push(prefix);
        s.hidden = prefix.len();
        s
    }

    /// `text[from..to]` less what the client wrote.
    fn out(&self, from: usize, to: usize) -> &str {
        &self.text[from.max(self.hidden).min(to)..to]
    }

    /// Add `piece`; returns the content that is safe to give out now.
    pub fn push(&mut self, piece: &str) -> &str {
        let from = self.sent;
        self.text.push_str(piece);
        if self.calls_at.is_some() {
            return "";
        }
        if let Some(p) = self.text[from..].find(CALLS_START) {
            self.calls_at = Some(from + p);
            self.sent = from + p;
            return self.out(from, from + p);
        }
        // Hold back the longest tail that could still become the block's start.
        let keep = self.text[from..]
            .char_indices()
            .map(|(i, _)| from + i)
            .find(|&i| CALLS_START.starts_with(&self.text[i..]))
            .unwrap_or(self.text.len());
        self.sent = keep;
        self.out(from, keep)
    }

    /// Whether a tool-call block has started.
    pub fn in_calls(&self) -> bool {
        self.calls_at.is_some()
    }

    /// At the end without a block: the held-back tail, which is content after all.
    pub fn finish(&mut self) -> &str {
        if self.calls_at.is_some() {
            return "";
        }
        let from = self.sent;
        self.sent = self.text.len();
        self.out(from, self.text.len())
    }

    /// The whole answer text, prefix included.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// From `at`, the text up to the earliest of `stops`: (index after the stop, the text, the
/// stop found).
fn read_until<'a>(
    text: &'a str,
    at: usize,
    stops: &[&'a str],
) -> (usize, &'a str, Option<&'a str>) {
    let found = stops
        .iter()
        .filter_map(|s| text[at..].find(s).map(|p| (at + p, *s)))
        .min_by_key(|&(p, _)| p);
    match found {
        Some((p, s)) => (p + s.len(), &text[at..p], Some(s)),
        None => (text.len(), &text[at..], None),
    }
}

/// Parse a completion (what the model wrote after the prompt's `<think>` or `</think>`, up to
/// and with its end-of-sentence token): the reasoning (thinking mode), the content, and the
/// DSML tool calls. Malformed markup is an error, never content.
pub fn parse_completion(f: &ChatFormat, text: &str, thinking: bool) -> Result<Parsed, DsmlError> {
    let (eos, think_close) = (f.eos, f.think_close);
    let calls_start = CALLS_START;
    let mut p = Parsed::default();
    let mut at = 0;
    if thinking {
        let (i, r, stop) = read_until(text, at, &[think_close, calls_start]);
        if stop != Some(think_close) {
            return err("Invalid thinking format: missing </think>");
        }
        p.reasoning_content = r.to_string();
        at = i;
    }
    let (i, c, stop) = read_until(text, at, &[eos, calls_start]);
    p.content = c.to_string();
    at = i;
    let mut last = stop;
    if stop == Some(calls_start) {
        let (i, calls) = parse_calls(text, at)?;
        p.tool_calls = calls;
        let (i, rest, s2) = read_until(text, i, &[eos]);
        if !rest.is_empty() {
            return err("Unexpected content after tool calls");
        }
        at = i;
        last = s2;
    } else if stop != Some(eos) {
        return err("Invalid format: missing EOS token");
    }
    if at != text.len() || last.is_some_and(|s| s != eos) {
        return err("Unexpected content at end");
    }
    for sp in [f.bos, eos, f.think_open, think_close, DSML] {
        if p.content.contains(sp) || p.reasoning_content.contains(sp) {
            return err(format!("Unexpected special token '{sp}' in content"));
        }
    }
    Ok(p)
}

/// The calls of a `<｜DSML｜tool_calls` block from `at` (just after its name).
fn parse_calls(text: &str, mut at: usize) -> Result<(usize, Vec<ToolCall>), DsmlError> {
    let invoke = format!("<{DSML}invoke");
    let end = format!("</{DSML}tool_calls>");
    let param = format!("<{DSML}parameter");
    let invoke_end = format!("</{DSML}invoke");
    let param_end = format!("/{DSML}parameter");
    let mut calls = Vec::new();
    while at < text.len() {
        let (i, between, s) = read_until(text, at, &[&invoke, &end]);
        if between != ">\n" {
            return err(format!(
                "Tool call format error: expected '>\\n' but got '{between}'"
            ));
        }
        at = i;
        if s == Some(end.as_str()) {
            break;
        }
        if s.is_none() {
            return err("Missing special token in tool calls");
        }
        let (i, head, mut s) = read_until(text, at, &[&param, &invoke_end]);
        at = i;
        // The release's pattern `^\s*name="(.*?)">\n$`: `$` also matches before a final
        // newline.
        let name = head
            .trim_start()
            .strip_prefix("name=\"")
            .and_then(|h| {
                h.strip_suffix("\">\n\n")
                    .or_else(|| h.strip_suffix("\">\n"))
            })
            .ok_or_else(|| DsmlError(format!("Tool name format error: '{head}'")))?;
        let mut args: Vec<(String, String, bool)> = Vec::new();
        while s == Some(param.as_str()) {
            let (i, body, _) = read_until(text, at, &[&param_end]);
            at = i;
            let (key, is_str, value) = parse_param(body)?;
            if args.iter().any(|(k, _, _)| *k == key) {
                return err(format!("Duplicate parameter name: '{key}'"));
            }
            args.push((key, value, is_str));
            let (i, between, s2) = read_until(text, at, &[&param, &invoke_end]);
            if between != ">\n" {
                return err(format!(
                    "Parameter format error: expected '>\\n' but got '{between}'"
                ));
            }
            at = i;
            s = s2;
        }
        // The arguments as the release writes them: string values JSON-quoted, the others
        // as they stand.
        let fields: Vec<String> = args
            .iter()
            .map(|(k, v, is_str)| {
                let v = if *is_str {
                    py_json(&Value::String(v.clone()))
                } else {
                    v.clone()
                };
                format!("{}: {v}", py_json(&Value::String(k.clone())))
            })
            .collect();
        calls.push(ToolCall {
            name: name.to_string(),
            arguments: format!("{{{}}}", fields.join(", ")),
        });
    }
    Ok((at, calls))
}

/// ` name="K" string="true|false">VALUE<` (what lies between `<｜DSML｜parameter` and
/// `/｜DSML｜parameter`): the name ends at the first flag.
fn parse_param(body: &str) -> Result<(String, bool, String), DsmlError> {
    let bad = || DsmlError(format!("Parameter format error: '{body}'"));
    let rest = body.strip_prefix(" name=\"").ok_or_else(bad)?;
    let inner = rest
        .strip_suffix('<')
        .or_else(|| rest.strip_suffix("<\n"))
        .ok_or_else(bad)?;
    let flags = [
        ("\" string=\"true\">", true),
        ("\" string=\"false\">", false),
    ];
    let (p, flag, is_str) = flags
        .iter()
        .filter_map(|&(f, is_str)| inner.find(f).map(|p| (p, f, is_str)))
        .min_by_key(|x| x.0)
        .ok_or_else(bad)?;
    Ok((
        inner[..p].to_string(),
        is_str,
        inner[p + flag.len()..].to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (f, want) in [
            (1.5, "1.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (12345.0, "12345.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (-0.5, "-0.5"),
            (0.0, "0.0"),
            (123456789012345.6, "123456789012345.6"),
            (2.5e-7, "2.5e-07"),
        ] {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn python_json_layout() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, "é\n\u0001", null, true], "a": {}}"#).unwrap();
        assert_eq!(
            py_json(&v),
            r#"{"b": [1, "é\n\u0001", null, true], "a": {}}"#
        );
    }
}
