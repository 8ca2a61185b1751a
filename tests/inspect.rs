//! `dsflash inspect` and `dsflash synth` on the oracle's tiny checkpoint and on the real
//! V4-Flash layout (synthesised sparse: 46 shards, 159.6 GB apparent, ~no disk).

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn inspect_json(dir: &Path) -> serde_json::Value {
    let o = run(&["inspect", "--model", dir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(
        out.trim_end().lines().count(),
        1,
        "one JSON object on one line"
    );
    serde_json::from_str(&out).expect("inspect --json parses")
}

/// Sum over the shards of (file size - 8 - header length): the payload the files hold.
fn payload_on_disk(dir: &Path) -> (u64, usize) {
    let mut total = 0;
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") && !p.ends_with("goldens.safetensors")
        {
            let mut f = std::fs::File::open(&p).unwrap();
            let mut b = [0u8; 8];
            std::io::Read::read_exact(&mut f, &mut b).unwrap();
            total += std::fs::metadata(&p).unwrap().len() - 8 - u64::from_le_bytes(b);
            n += 1;
        }
    }
    (total, n)
}

#[test]
fn tiny_fixture_numbers() {
    let dir = fixture("tiny");
    let j = inspect_json(&dir);
    // The oracle's verify.py check B: 508 tensors; its index says total_size 14,866,296.
    assert_eq!(j["tensor_count"], 508);
    assert_eq!(j["total_bytes"], 14_866_296u64);
    let (on_disk, shards) = payload_on_disk(&dir);
    assert_eq!(on_disk, 14_866_296);
    assert_eq!(j["shards"], shards);
    // 52 FP8 and 144 FP4 weights (verify.py check B), each with one E8M0 scale.
    assert_eq!(j["dtype_counts"]["F8_E4M3"], 52);
    assert_eq!(j["dtype_counts"]["I8"], 144);
    assert_eq!(j["dtype_counts"]["F8_E8M0"], 52 + 144);
    let comps: u64 = j["components"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(comps, 14_866_296, "components add up to the total");
    let layers = j["layers"].as_array().unwrap();
    let pat: Vec<(u64, &str, &str)> = layers
        .iter()
        .map(|l| {
            (
                l["compress_ratio"].as_u64().unwrap(),
                l["attention"].as_str().unwrap(),
                l["routing"].as_str().unwrap(),
            )
        })
        .collect();
    // The oracle README's layer table.
    assert_eq!(
        pat,
        vec![
            (0, "sliding", "hash"),
            (4, "CSA", "hash"),
            (128, "HCA", "score"),
            (4, "CSA", "score"),
            (128, "HCA", "score"),
            (0, "sliding", "score"),
        ]
    );
    // Human output names the same numbers.
    let o = run(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(
        text.contains("14,866,296") && text.contains("1 sliding, 2 CSA"),
        "{text}"
    );
}

#[test]
fn real_layout_via_sparse_synth() {
    let out = tempfile::tempdir().unwrap();
    let cfg = fixture("deepseek-v4-flash-config.json");
    let o = run(&[
        "synth",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--sparse",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = inspect_json(out.path());
    // Spec §2/§3.6.
    assert_eq!(j["tensor_count"], 69_187);
    assert_eq!(j["total_bytes"], 159_609_485_896u64);
    assert_eq!(j["shards"], 46);
    assert_eq!(j["bytes_per_token"], 11_217_580_396u64);
    let c = &j["components"];
    assert_eq!(c["embed"], 1_059_061_760u64);
    assert_eq!(c["head"], 1_059_061_760u64);
    assert_eq!(c["routed_experts"], 147_169_738_752u64);
    assert_eq!(c["shared_expert"], 1_082_196_480u64);
    assert_eq!(c["attention"], 4_599_478_144u64);
    assert_eq!(c["compressors"], 525_722_624u64);
    assert_eq!(c["indexers"], 275_353_344u64);
    assert_eq!(c["mtp"], 3_593_787_756u64);
    assert_eq!(j["dtype_counts"]["F8_E8M0"], 34_167);
    assert_eq!(j["dtype_counts"]["I64"], 3);
    let layers = j["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 44);
    assert_eq!(
        layers.iter().filter(|l| l["attention"] == "CSA").count(),
        21
    );
    assert_eq!(
        layers.iter().filter(|l| l["attention"] == "HCA").count(),
        20
    );
    assert_eq!(layers.iter().filter(|l| l["routing"] == "hash").count(), 3);
    // The files hold exactly that payload, in 46 shards, and cost (almost) no disk.
    let (on_disk, shards) = payload_on_disk(out.path());
    assert_eq!((on_disk, shards), (159_609_485_896, 46));
    let allocated: u64 = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum();
    assert!(
        allocated < 64 << 20,
        "sparse files allocate {allocated} bytes"
    );
    // The index is the standard HF one and agrees.
    let idx: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(idx["metadata"]["total_size"], 159_609_485_896u64);
    assert_eq!(
        idx["weight_map"]["layers.0.attn.wq_a.weight"],
        "model-00002-of-00046.safetensors"
    );
    assert_eq!(
        idx["weight_map"]["head.weight"],
        "model-00045-of-00046.safetensors"
    );
}

#[test]
fn synth_is_deterministic_and_valid() {
    let cfg = fixture("tiny/config.json");
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [&a, &b] {
        let o = run(&[
            "synth",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            d.path().to_str().unwrap(),
            "--seed",
            "7",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let j = inspect_json(a.path());
    assert_eq!(j["tensor_count"], 508);
    assert_eq!(
        j["total_bytes"], 14_866_296u64,
        "same layout as the oracle's tiny model"
    );
    for e in std::fs::read_dir(a.path()).unwrap() {
        let name = e.unwrap().file_name();
        let x = std::fs::read(a.path().join(&name)).unwrap();
        let y = std::fs::read(b.path().join(&name)).unwrap();
        assert!(
            x == y,
            "{name:?} differs between two runs with the same seed"
        );
        if name.to_string_lossy().ends_with(".safetensors") {
            for (k, (dtype, _shape, bytes)) in read_safetensors(&a.path().join(&name)) {
                match dtype.as_str() {
                    "F8_E8M0" => assert!(!bytes.contains(&255), "{k}: NaN scale"),
                    "F8_E4M3" => assert!(!bytes.iter().any(|&c| c & 0x7F == 0x7F), "{k}: NaN code"),
                    "F32" => assert!(as_f32(&bytes).iter().all(|v| v.is_finite()), "{k}"),
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn verbose_notes_unused_tensors() {
    let d = copy_dir(&fixture("tiny"));
    edit_header(&d.path().join("model-00002-of-00002.safetensors"), |h| {
        // An extra tensor, as a later release's speculative module would add (zero bytes, at the end).
        let end = h
            .values()
            .filter_map(|v| v.get("data_offsets").and_then(|o| o[1].as_u64()))
            .max()
            .unwrap();
        h.insert(
            "mtp.1.dspark.proj.weight".into(),
            serde_json::json!({"dtype": "F32", "shape": [0], "data_offsets": [end, end]}),
        );
    });
    let o = run(&[
        "inspect",
        "--verbose",
        "--model",
        d.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ignoring 1 tensors")
            && stderr(&o).contains("mtp.1.dspark.proj.weight"),
        "{}",
        stderr(&o)
    );
    let o = run(&["inspect", "--model", d.path().to_str().unwrap()]);
    assert!(stderr(&o).is_empty(), "no note without --verbose");
}

#[test]
fn repo_id_resolves_through_the_hub_cache() {
    // Standard hub layout: models--org--name/refs/main -> snapshots/<hash>/...
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--deepseek-ai--DeepSeek-V4-Flash");
    let snap = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    for e in std::fs::read_dir(fixture("tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    let o = std::process::Command::new(bin())
        .args([
            "inspect",
            "--json",
            "--model",
            "deepseek-ai/DeepSeek-V4-Flash",
        ])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["tensor_count"], 508);
    // Not in the cache: a clear error naming the repo and the cache.
    let o = std::process::Command::new(bin())
        .args(["inspect", "--model", "someone/missing-model"])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("someone/missing-model") && stderr(&o).contains("cache"),
        "{}",
        stderr(&o)
    );
}
