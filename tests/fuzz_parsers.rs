//! Property-based fuzzing of the header and config parsers (proptest). Each property feeds
//! arbitrary or mutated inputs and requires: no panic, and every error a single line.
//! Longer runs: `PROPTEST_CASES=200000 cargo test --release --test fuzz_parsers`.

mod common;
use common::fixture;
use dsflash::model::ModelConfig;
use dsflash::model::checkpoint::parse_shard_header;
use proptest::prelude::*;

fn shard_bytes() -> Vec<u8> {
    // A real shard header followed by a small data section (the tiny model's second shard
    // header, with its data truncated to keep the cases small).
    std::fs::read(fixture("tiny/model-00001-of-00002.safetensors")).unwrap()
}

fn config_text() -> String {
    std::fs::read_to_string(fixture("deepseek-v4-flash-config.json")).unwrap()
}

fn check_header(buf: &[u8]) {
    if let Err(e) = parse_shard_header("fuzz.safetensors", buf) {
        assert!(!e.contains('\n'), "multi-line error: {e}");
        assert!(
            e.starts_with("fuzz.safetensors"),
            "error names the file: {e}"
        );
    }
}

fn check_config(bytes: &[u8]) {
    if let Err(e) = ModelConfig::from_json_bytes(bytes, "config.json") {
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s}");
        assert!(s.starts_with("config.json"), "{s}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn header_arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_header(&buf);
    }

    #[test]
    fn header_with_arbitrary_length_prefix(n in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = n.to_le_bytes().to_vec();
        buf.extend(body);
        check_header(&buf);
    }

    #[test]
    fn header_byte_mutations(muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut buf = shard_bytes();
        let hlen = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize + 8;
        for (i, b) in muts {
            let at = i.index(hlen); // mutate the length prefix and the JSON header
            buf[at] = b;
        }
        check_header(&buf);
    }

    #[test]
    fn header_json_edits(
        which in any::<prop::sample::Index>(),
        start in any::<u32>(),
        len in 0u64..1_000_000,
        dtype in prop::sample::select(vec!["F32", "BF16", "I8", "F8_E4M3", "F8_E8M0", "I64", "XX", "F4"]),
        shape in proptest::collection::vec(0usize..5000, 0..4),
    ) {
        let buf = shard_bytes();
        let n = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
        let mut h: serde_json::Value = serde_json::from_slice(&buf[8..8 + n]).unwrap();
        let data = &buf[8 + n..];
        let keys: Vec<String> = h.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
        let k = &keys[which.index(keys.len())];
        h[k] = serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start as u64, start as u64 + len]});
        let mut hb = serde_json::to_vec(&h).unwrap();
        while !hb.len().is_multiple_of(8) { hb.push(b' '); }
        let mut out = (hb.len() as u64).to_le_bytes().to_vec();
        out.extend(hb);
        out.extend_from_slice(data);
        check_header(&out);
    }

    #[test]
    fn config_arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_config(&buf);
    }

    #[test]
    fn config_field_edits(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..6, any::<i64>()), 1..4)
    ) {
        let mut v: serde_json::Value = serde_json::from_str(&config_text()).unwrap();
        let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        for (i, kind, x) in edits {
            let k = keys[i.index(keys.len())].clone();
            let o = v.as_object_mut().unwrap();
            match kind {
                0 => { o.remove(&k); }
                1 => { o.insert(k, x.into()); }
                2 => { o.insert(k, (x as f64 / 7.0).into()); }
                3 => { o.insert(k, format!("{x}").into()); }
                4 => { o.insert(k, serde_json::Value::Null); }
                _ => { o.insert(k, serde_json::json!([x, x])); }
            }
        }
        check_config(v.to_string().as_bytes());
    }

    #[test]
    fn config_text_mutations(muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut b = config_text().into_bytes();
        for (i, x) in muts {
            let at = i.index(b.len());
            b[at] = x;
        }
        check_config(&b);
    }
}

/// Pieces a model's completion is made of, to splice at random (DSML tags, the thinking and
/// end-of-sentence tokens, parameter flags, newlines, text).
const DSML_PIECES: &[&str] = &[
    "\n\n<｜DSML｜tool_calls>",
    "</｜DSML｜tool_calls>",
    "<｜DSML｜invoke name=\"f\">",
    "</｜DSML｜invoke>",
    "<｜DSML｜parameter name=\"a\" string=\"true\">",
    "<｜DSML｜parameter name=\"b\" string=\"false\">",
    "</｜DSML｜parameter>",
    "\n",
    ">",
    "<",
    "\"",
    "</think>",
    "<think>",
    "<｜end▁of▁sentence｜>",
    "text é 東京",
    "{\"x\": [1, 2]}",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// A completion spliced from DSML pieces: parsed or refused with a one-line error, never
    /// a panic; what parses has no markup left in its content.
    #[test]
    fn dsml_completions_parse_or_refuse(
        picks in proptest::collection::vec(0..DSML_PIECES.len(), 0..24),
        thinking in any::<bool>(),
    ) {
        let text: String = picks.iter().map(|&i| DSML_PIECES[i]).collect();
        match dsflash::model::dsml::parse_completion(&dsflash::model::chat_format::DSV4, &text, thinking) {
            Ok(p) => {
                let markup = p.content.contains("｜DSML｜") || p.content.contains("<｜end▁of▁sentence｜>");
                prop_assert!(!markup, "markup in content {:?}", p.content);
                for c in &p.tool_calls {
                    prop_assert!(c.arguments.starts_with('{'), "arguments {:?}", c.arguments);
                }
            }
            Err(e) => prop_assert!(!e.0.is_empty()),
        }
    }

    /// Arbitrary JSON as a message's tools or tool calls: rendered or refused naming the
    /// message, never a panic.
    #[test]
    fn arbitrary_tools_and_calls_render_or_refuse(
        tools in "[\\[\\]{}\",:a-z0-9 ]{0,40}",
        calls in "[\\[\\]{}\",:a-z0-9 ]{0,40}",
    ) {
        use dsflash::model::chat_format::{DSV4, Message, Mode, Role, render};
        let (Ok(t), Ok(c)) = (serde_json::from_str(&tools), serde_json::from_str(&calls)) else {
            return Ok(());
        };
        let mut sys = Message::new(Role::System, "s");
        sys.tools = Some(t);
        let mut a = Message::new(Role::Assistant, "");
        a.tool_calls = Some(c);
        let msgs = [sys, Message::new(Role::User, "u"), a];
        if let Err(e) = render(&DSV4, &msgs, Mode::Think) {
            prop_assert!(e.to_string().starts_with("message "), "{e}");
        }
    }
}
