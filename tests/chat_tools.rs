//! Tool calls in the chat format against the release's encoder
//! (tests/fixtures/chat/tool-goldens.json, by scripts/make_tool_goldens.py): prompts with
//! tools, DSML tool calls and tool results rendered to the same text and token ids, and
//! completions parsed into the same reasoning, content and tool calls, or refused where the
//! release's parser refuses them.

mod common;
use common::*;
use dsflash::model::chat_format::{DSV4, Message, Mode, render};
use dsflash::model::dsml::parse_completion;
use dsflash::model::tokenizer::Tokenizer;

fn goldens() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("chat/tool-goldens.json")).unwrap()).unwrap()
}

#[test]
fn prompts_with_tools_render_as_the_release_encoder() {
    let g = goldens();
    let tok = Tokenizer::from_file(&tokenizer_path()).expect("tokenizer");
    let cases = g["encode"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let mode = match (c["mode"].as_str().unwrap(), c["reasoning_effort"].as_str()) {
            ("chat", _) => Mode::Chat,
            (_, Some("max")) => Mode::ThinkMax,
            _ => Mode::Think,
        };
        let text = render(&DSV4, &msgs, mode).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(text, c["text"].as_str().unwrap(), "{name}: text");
        let ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(tok.encode(&text).unwrap(), ids, "{name}: token ids");
    }
}

#[test]
fn completions_parse_as_the_release_parser() {
    let g = goldens();
    for c in g["parse"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let thinking = c["mode"] == "thinking";
        let got = parse_completion(&DSV4, c["text"].as_str().unwrap(), thinking);
        match (&c["result"], got) {
            (serde_json::Value::Null, Ok(p)) => {
                panic!("{name}: parsed, the release refuses: {p:?}")
            }
            (serde_json::Value::Null, Err(e)) => {
                assert_eq!(e.0, c["error"].as_str().unwrap(), "{name}: error")
            }
            (want, Ok(p)) => {
                assert_eq!(p.content, want["content"], "{name}: content");
                assert_eq!(
                    p.reasoning_content, want["reasoning_content"],
                    "{name}: reasoning"
                );
                let calls: Vec<serde_json::Value> = p
                    .tool_calls
                    .iter()
                    .map(|t| {
                        serde_json::json!({"type": "function",
                            "function": {"name": t.name, "arguments": t.arguments}})
                    })
                    .collect();
                assert_eq!(
                    serde_json::Value::from(calls),
                    want["tool_calls"],
                    "{name}: calls"
                );
            }
            (_, Err(e)) => panic!("{name}: refused ({e}), the release parses it"),
        }
    }
}

#[test]
fn streamed_content_stops_where_the_release_parser_finds_the_calls() {
    // The answers the release parses (after `</think>`, before EOS), cut into pieces at every
    // character boundary, one piece per character, and with the first part given as a prefix:
    // the content given out is the release's content, and the block is found iff it has calls.
    use dsflash::model::dsml::CallSplitter;
    let g = goldens();
    let mut checked = 0;
    for c in g["parse"].as_array().unwrap() {
        let want = &c["result"];
        if want.is_null() {
            continue;
        }
        let text = c["text"].as_str().unwrap();
        let answer = text.rsplit_once("</think>").map_or(text, |(_, a)| a);
        let answer = answer.strip_suffix(DSV4.eos).unwrap_or(answer);
        let has_calls = want["tool_calls"].as_array().is_some_and(|a| !a.is_empty());
        let cuts: Vec<usize> = answer.char_indices().map(|(i, _)| i).collect();
        let check = |pieces: &[&str], prefix: &str, what: &str| {
            let mut s = CallSplitter::with_prefix(prefix);
            let mut out = String::new();
            for p in pieces {
                out.push_str(s.push(p));
            }
            out.push_str(s.finish());
            let content = want["content"].as_str().unwrap();
            let shown = content.strip_prefix(prefix).unwrap_or("");
            assert_eq!(out, shown, "{}: content ({what})", c["name"]);
            assert_eq!(s.in_calls(), has_calls, "{}: calls ({what})", c["name"]);
            assert_eq!(s.text(), answer);
        };
        for &k in &cuts {
            check(&[&answer[..k], &answer[k..]], "", "two pieces");
            check(&[&answer[k..]], &answer[..k], "prefix");
        }
        let chars: Vec<String> = answer.chars().map(String::from).collect();
        check(
            &chars.iter().map(String::as_str).collect::<Vec<_>>(),
            "",
            "per char",
        );
        checked += 1;
    }
    assert!(checked >= 4, "{checked}");
}
