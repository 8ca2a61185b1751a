//! Bad-input matrix for checkpoint loading: each case exits 1 with a one-line error that
//! names the culprit, and never panics.

mod common;
use common::*;
use std::path::Path;

const S1: &str = "model-00001-of-00002.safetensors";
const S2: &str = "model-00002-of-00002.safetensors";

/// Run `inspect` on `dir` and check the error contract; returns the message.
fn expect_error(dir: &Path, must_contain: &[&str]) -> String {
    let o = run(&["inspect", "--model", dir.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    for m in must_contain {
        assert!(err.contains(m), "expected {m:?} in: {err}");
    }
    assert!(stdout(&o).is_empty(), "nothing on stdout on error");
    err
}

fn tiny() -> tempfile::TempDir {
    copy_dir(&fixture("tiny"))
}

#[test]
fn truncated_shard() {
    let d = tiny();
    let p = d.path().join(S2);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    expect_error(d.path(), &[S2, "truncated", "1000 missing"]);
}

#[test]
fn shard_shorter_than_a_header() {
    let d = tiny();
    std::fs::write(d.path().join(S1), b"abc").unwrap();
    expect_error(d.path(), &[S1, "truncated"]);
}

#[test]
fn corrupted_header_json() {
    let d = tiny();
    let p = d.path().join(S1);
    let mut b = std::fs::read(&p).unwrap();
    b[8] = b'#'; // the opening brace of the JSON header
    std::fs::write(&p, b).unwrap();
    expect_error(d.path(), &[S1, "not valid safetensors JSON"]);
}

#[test]
fn offsets_past_the_end() {
    let d = tiny();
    let p = d.path().join(S1);
    // The tensor with the largest end offset claims 1 MiB more than its dtype/shape hold.
    edit_header(&p, |h| {
        let (name, end) = h
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(k, v)| (k.clone(), v["data_offsets"][1].as_u64().unwrap()))
            .max_by_key(|x| x.1)
            .unwrap();
        h[&name]["data_offsets"][1] = (end + (1 << 20)).into();
    });
    expect_error(d.path(), &[S1, "byte range does not match"]);
}

#[test]
fn overlapping_offsets() {
    let d = tiny();
    let p = d.path().join(S1);
    let mut victim = String::new();
    edit_header(&p, |h| {
        // Make the second tensor (by offset) start where the first one starts.
        let mut v: Vec<(String, u64, u64)> = h
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(k, v)| {
                (
                    k.clone(),
                    v["data_offsets"][0].as_u64().unwrap(),
                    v["data_offsets"][1].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort_by_key(|x| x.1);
        let (name, s, e) = v[1].clone();
        h[&name]["data_offsets"] = serde_json::json!([s - 8, e - 8]);
        victim = name;
    });
    expect_error(d.path(), &[S1, "overlap"]);
}

#[test]
fn missing_shard() {
    let d = tiny();
    std::fs::remove_file(d.path().join(S2)).unwrap();
    expect_error(d.path(), &[S2, "missing"]);
}

#[test]
fn missing_tensor() {
    let d = tiny();
    let name = "layers.0.attn.attn_sink";
    edit_header(&d.path().join(S1), |h| {
        let v = h.remove(name).unwrap();
        h.insert("layers.0.attn.attn_sink_renamed".into(), v);
    });
    let ip = d.path().join("model.safetensors.index.json");
    let mut idx: serde_json::Value = serde_json::from_slice(&std::fs::read(&ip).unwrap()).unwrap();
    let wm = idx["weight_map"].as_object_mut().unwrap();
    let f = wm.remove(name).unwrap();
    wm.insert("layers.0.attn.attn_sink_renamed".into(), f);
    std::fs::write(&ip, serde_json::to_vec(&idx).unwrap()).unwrap();
    expect_error(d.path(), &[name, "missing"]);
}

#[test]
fn tensor_listed_in_index_but_not_in_shard() {
    let d = tiny();
    edit_header(&d.path().join(S1), |h| {
        let v = h.remove("norm.weight").unwrap();
        h.insert("norm.weight.moved".into(), v);
    });
    let o = run(&["inspect", "--model", d.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("2 problems"), "{}", stderr(&o));
    // Both reported at once under --verbose (not only the first).
    let o = run(&["inspect", "-v", "--model", d.path().to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("2 problems"), "{err}");
    assert!(
        err.contains("norm.weight is listed in model.safetensors.index.json"),
        "{err}"
    );
    assert!(err.contains("tensor norm.weight is missing"), "{err}");
}

#[test]
fn wrong_dtype() {
    let d = tiny();
    // F32 [4] -> BF16 [8]: same byte length, wrong dtype.
    edit_header(&d.path().join(S1), |h| {
        h["layers.0.attn.attn_sink"]["dtype"] = "BF16".into();
        h["layers.0.attn.attn_sink"]["shape"] = serde_json::json!([8]);
    });
    expect_error(
        d.path(),
        &[S1, "layers.0.attn.attn_sink", "dtype BF16, expected F32"],
    );
}

#[test]
fn wrong_shape() {
    let d = tiny();
    edit_header(&d.path().join(S1), |h| {
        h["layers.0.attn.attn_sink"]["shape"] = serde_json::json!([2, 2]);
    });
    expect_error(
        d.path(),
        &["layers.0.attn.attn_sink", "shape [2, 2], expected [4]"],
    );
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn bad_config_field() {
    let d = tiny();
    edit_config(d.path(), |v| {
        v["compress_ratios"].as_array_mut().unwrap().push(4.into())
    });
    expect_error(d.path(), &["config.json", "`compress_ratios`", "7 entries"]);
}

#[test]
fn config_field_of_wrong_type() {
    let d = tiny();
    edit_config(d.path(), |v| v["num_attention_heads"] = "four".into());
    expect_error(d.path(), &["config.json", "`num_attention_heads`"]);
}

#[test]
fn config_missing_field() {
    let d = tiny();
    edit_config(d.path(), |v| {
        v.as_object_mut().unwrap().remove("q_lora_rank");
    });
    expect_error(d.path(), &["config.json", "`q_lora_rank`", "missing"]);
}

#[test]
fn unsupported_model_type() {
    let d = tiny();
    edit_config(d.path(), |v| v["model_type"] = "deepseek_v3".into());
    expect_error(d.path(), &["`model_type`", "deepseek_v3", "not supported"]);
}

#[test]
fn config_shapes_disagree_with_files() {
    // A config for a bigger model than the files hold: every mismatch is reported at once.
    let d = tiny();
    edit_config(d.path(), |v| v["num_attention_heads"] = 8.into());
    let o = run(&["inspect", "--model", d.path().to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("problems in the checkpoint"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("--verbose"), "{err}");
    // --verbose lists each of them.
    let o = run(&[
        "inspect",
        "--verbose",
        "--model",
        d.path().to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("layers.4.attn.attn_sink") && err.contains("expected [8]"),
        "{err}"
    );
    assert!(err.lines().count() > 3, "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn empty_directory() {
    let d = tempfile::tempdir().unwrap();
    expect_error(d.path(), &["not a checkpoint", "no config.json"]);
}

#[test]
fn unreadable_shard() {
    // Root can read a chmod-000 file, so make the shard unreadable another way: a directory
    // in its place.
    let d = tiny();
    std::fs::remove_file(d.path().join(S2)).unwrap();
    std::fs::create_dir(d.path().join(S2)).unwrap();
    expect_error(d.path(), &[S2, "cannot open", "a directory"]);
}

#[test]
fn corrupt_index() {
    let d = tiny();
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        b"{\"weight_map\": [1,2]}",
    )
    .unwrap();
    expect_error(
        d.path(),
        &[
            "model.safetensors.index.json",
            "not a valid safetensors index",
        ],
    );
}

#[test]
fn model_path_that_does_not_exist() {
    let o = run(&["inspect", "--model", "/nonexistent/checkpoint"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--model /nonexistent/checkpoint"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_flag_is_usage_error() {
    let o = run(&["inspect", "--modle", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--modle"));
}

#[test]
fn hash_table_with_out_of_range_expert() {
    // tid2eid is data: an expert id >= n_routed_experts must be refused, not indexed.
    let d = tiny();
    let p = d.path().join(S1);
    let (h, mut data) = read_shard(&p);
    let o: (usize, usize) =
        serde_json::from_value(h["layers.0.ffn.gate.tid2eid"]["data_offsets"].clone()).unwrap();
    data[o.0..o.0 + 8].copy_from_slice(&99i64.to_le_bytes());
    write_shard(&p, &h, &data);
    // inspect does not read payloads; loading the weights does (the `logits` path).
    let err = dsflash::model::weights::ModelWeights::from_checkpoint(
        &dsflash::model::Checkpoint::open(d.path()).unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("layers.0.ffn.gate.tid2eid") && err.contains("99"),
        "{err}"
    );
}
